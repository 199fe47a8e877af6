// Script droppers: PowerShell, VBA macros and VBScript that fetch or unpack
// a payload and run it.

rule Dropper_PowerShell_Encoded_Command
{
    meta:
        threat = "Trojan.PowerShell.EncodedLauncher"
        severity = "high"
        description = "PowerShell started hidden with a long base64 -EncodedCommand, the usual way droppers hide their second stage"

    strings:
        $enc = /powershell(\.exe)?["']?(\s+-\w+(\s+\w+)?){0,8}\s+-e(nc|ncodedcommand|ncodedc)?\s+[A-Za-z0-9+\/]{60,}={0,2}/ nocase
        $hidden = /-w(indowstyle)?\s+h(idden)?/ nocase
        $noprofile = /-nop(rofile)?/ nocase
        $bypass = /-ex(ecutionpolicy|ec)?\s+bypass/ nocase

    condition:
        $enc and ($hidden or $noprofile or $bypass)
}

rule Dropper_PowerShell_Download_Cradle
{
    meta:
        threat = "Trojan.PowerShell.DownloadCradle"
        severity = "high"
        description = "PowerShell that downloads a script from the network and runs it in memory"

    strings:
        $iex = /(IEX|Invoke-Expression)\s*\(?/ nocase
        $dl1 = /New-Object\s+(System\.)?Net\.WebClient\)?\s*\.\s*DownloadString\s*\(\s*['"]https?:\/\//i
        $dl2 = /Invoke-WebRequest\s+(-Uri\s+)?['"]?https?:\/\/[^\s'"]+['"]?\s*(-UseBasicParsing\s*)?\)?\s*\.\s*Content/ nocase
        $dl3 = /\bIWR\s+['"]?https?:\/\/[^\s|]+\s*\|\s*IEX/ nocase
        // Documentation quoting an installer one-liner in a Markdown code
        // block is not a script that runs.
        $markdown_fence = "```"

    condition:
        $iex and any of ($dl*) and not $markdown_fence
}

rule Dropper_PowerShell_AMSI_Bypass
{
    meta:
        threat = "Trojan.PowerShell.AmsiBypass"
        severity = "critical"
        description = "PowerShell that disables the Antimalware Scan Interface before running its payload"

    strings:
        $utils = "AmsiUtils" ascii wide nocase
        $failed = "amsiInitFailed" ascii wide nocase
        $scanbuf = "AmsiScanBuffer" ascii wide nocase
        $patch = /VirtualProtect.{0,200}AmsiScanBuffer|AmsiScanBuffer.{0,200}VirtualProtect/ nocase

    condition:
        ($utils and $failed) or ($scanbuf and $patch)
}

rule Dropper_Macro_AutoExec_Shell
{
    meta:
        threat = "TrojanDownloader.VBA.AutoExec"
        severity = "high"
        description = "Office macro that runs on document open and starts a shell, PowerShell or a downloaded file"

    strings:
        $auto1 = /Sub\s+(AutoOpen|Auto_Open|Document_Open|Workbook_Open|Document_Close)\s*\(/ nocase
        $shell1 = /\bShell\s*\(?\s*["(]?\s*(cmd|powershell|mshta|wscript|cscript)/ nocase
        $shell2 = /CreateObject\s*\(\s*"WScript\.Shell"\s*\)/ nocase
        $shell3 = /CreateObject\s*\(\s*"Shell\.Application"\s*\)\s*\.\s*ShellExecute/ nocase
        $net1 = /URLDownloadToFile[AW]?/ nocase
        $net2 = /MSXML2\.(Server)?XMLHTTP/ nocase
        $net3 = /powershell/ nocase

    condition:
        $auto1 and any of ($shell*) and any of ($net*)
}

rule Dropper_VBScript_Downloader
{
    meta:
        threat = "TrojanDownloader.VBS.Agent"
        severity = "high"
        description = "VBScript or JScript that downloads a file over HTTP, writes it to disk with ADODB.Stream and runs it"

    strings:
        $http = /(MSXML2|Microsoft)\.(Server)?XMLHTTP|WinHttp\.WinHttpRequest/ nocase
        $stream = "ADODB.Stream" ascii wide nocase
        $save = /\.SaveToFile\s*\(?/ nocase
        $run = /\.(Run|Exec|ShellExecute)\s*\(?\s*[\w"]/ nocase
        $wsh = /WScript\.Shell|Shell\.Application/ nocase

    condition:
        filesize < 1MB and $http and $stream and $save and $run and $wsh
}
