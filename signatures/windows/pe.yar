// Windows PE traits: capabilities and tool fingerprints seen in malware,
// checked through the pe module so that only real PE files can match.

import "pe"

rule PE_Process_Injection_Imports
{
    meta:
        threat = "HackTool.Win.ProcessInjector"
        severity = "high"
        description = "PE importing the classic remote-thread injection triad (allocate, write, start a thread in another process)"

    condition:
        pe.is_pe
        and pe.imports("kernel32.dll", "OpenProcess")
        and pe.imports("kernel32.dll", "VirtualAllocEx")
        and pe.imports("kernel32.dll", "WriteProcessMemory")
        and pe.imports("kernel32.dll", "CreateRemoteThread")
}

rule PE_Keylogger_Imports
{
    meta:
        threat = "Spyware.Win.Keylogger"
        severity = "high"
        description = "PE that installs a low-level keyboard hook and polls key state, and hides its window"

    condition:
        pe.is_pe
        and (pe.imports("user32.dll", "SetWindowsHookExA") or pe.imports("user32.dll", "SetWindowsHookExW"))
        and pe.imports("user32.dll", "GetAsyncKeyState")
        and (pe.imports("user32.dll", "GetForegroundWindow") or pe.imports("user32.dll", "GetWindowTextW"))
        and pe.imports("user32.dll", "ShowWindow")
}

rule PE_Ransomware_Shadow_Copy_Wipe
{
    meta:
        threat = "Ransom.Win.Generic"
        severity = "critical"
        description = "PE that encrypts with CryptoAPI and deletes Volume Shadow Copies so files cannot be restored"

    strings:
        $vss1 = "vssadmin delete shadows" ascii wide nocase
        $vss2 = "vssadmin.exe delete shadows" ascii wide nocase
        $vss3 = "wmic shadowcopy delete" ascii wide nocase
        $bcd = "bcdedit /set {default} recoveryenabled no" ascii wide nocase

    condition:
        pe.is_pe
        and pe.imports("advapi32.dll", "CryptEncrypt")
        and (any of ($vss*) or $bcd)
}

rule PE_Mimikatz
{
    meta:
        threat = "HackTool.Win.Mimikatz"
        severity = "critical"
        description = "Mimikatz credential dumper (module commands and banner)"

    strings:
        $cmd1 = "sekurlsa::logonpasswords" ascii wide nocase
        $cmd2 = "lsadump::sam" ascii wide nocase
        $cmd3 = "privilege::debug" ascii wide nocase
        $cmd4 = "kerberos::golden" ascii wide nocase
        $banner = "gentilkiwi" ascii wide
        $name = "mimikatz" ascii wide nocase

    condition:
        pe.is_pe and 2 of ($cmd*) and ($banner or $name)
}

rule PE_Reflective_Loader
{
    meta:
        threat = "Backdoor.Win.ReflectiveDLL"
        severity = "high"
        description = "DLL built for reflective injection (exports or names a ReflectiveLoader), as Cobalt Strike and Metasploit payloads are"

    strings:
        $loader = "ReflectiveLoader" ascii

    condition:
        pe.is_pe
        and pe.characteristics & pe.DLL != 0
        and (pe.exports("ReflectiveLoader") or pe.exports("_ReflectiveLoader@4") or $loader)
}
