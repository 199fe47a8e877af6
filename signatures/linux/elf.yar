// Linux ELF threats: backdoors, botnets, rootkits and coin miners, checked
// through the elf module so that only real ELF files can match.

import "elf"

rule ELF_CoinMiner_XMRig
{
    meta:
        threat = "CoinMiner.Linux.XMRig"
        severity = "high"
        description = "XMRig Monero miner (stratum pool URL with its own option and algorithm names)"

    strings:
        $stratum = "stratum+tcp://" ascii
        $stratum_tls = "stratum+ssl://" ascii
        $xmrig = "xmrig" ascii nocase
        $opt1 = "--donate-level" ascii
        $opt2 = "randomx" ascii nocase
        $opt3 = "cryptonight" ascii nocase

    condition:
        (elf.type == elf.ET_EXEC or elf.type == elf.ET_DYN)
        and ($stratum or $stratum_tls)
        and $xmrig
        and 2 of ($opt*)
}

rule ELF_Mirai_Botnet
{
    meta:
        threat = "Backdoor.Linux.Mirai"
        severity = "critical"
        description = "Mirai IoT botnet: busybox self-check and telnet credential scanner"

    strings:
        $busybox = "/bin/busybox MIRAI" ascii
        $ecchi = "/bin/busybox ECCHI" ascii
        $watchdog1 = "/dev/watchdog" ascii
        $watchdog2 = "/dev/misc/watchdog" ascii
        $scan = "TSource Engine Query" ascii
        $cred = "xc3511" ascii

    condition:
        elf.type == elf.ET_EXEC
        and ($busybox or $ecchi)
        and any of ($watchdog*)
        and ($scan or $cred)
}

rule ELF_Backdoor_BPFDoor
{
    meta:
        threat = "Backdoor.Linux.BPFDoor"
        severity = "critical"
        description = "BPFDoor passive backdoor: fake daemon names and its mutex and PID files"

    strings:
        $pid1 = "/var/run/haldrund.pid" ascii
        $pid2 = "/var/run/kdevrund.pid" ascii
        $mutex = "/dev/shm/kdmtmpflush" ascii
        $fake1 = "/sbin/udevd -d" ascii
        $fake2 = "dbus-daemon --system" ascii
        $fake3 = "avahi-daemon: chroot helper" ascii

    condition:
        (elf.type == elf.ET_EXEC or elf.type == elf.ET_DYN)
        and ($mutex or any of ($pid*))
        and any of ($fake*)
}

rule ELF_Rootkit_LD_PRELOAD
{
    meta:
        threat = "Rootkit.Linux.Preload"
        severity = "critical"
        description = "Userland rootkit library that installs itself in /etc/ld.so.preload and hooks directory listing to hide files"

    strings:
        $preload = "/etc/ld.so.preload" ascii
        $hook1 = "readdir64" ascii
        $hook2 = "readdir" ascii
        $dlsym = "dlsym" ascii
        $proc = "/proc/net/tcp" ascii
        $hide = "HIDE_THIS" ascii nocase
        $magic = "MAGIC_GID" ascii nocase

    condition:
        elf.type == elf.ET_DYN
        and $preload and $dlsym and any of ($hook*) and $proc
        and ($hide or $magic)
}

rule ELF_Tsunami_IRC_Bot
{
    meta:
        threat = "Backdoor.Linux.Tsunami"
        severity = "high"
        description = "Tsunami/Kaiten IRC bot: IRC command handling and its flooder commands"

    strings:
        $irc1 = "PRIVMSG %s :" ascii
        $irc2 = "NOTICE %s :" ascii
        $cmd1 = "TSUNAMI <target> <secs>" ascii
        $cmd2 = "PAN <target> <port> <secs>" ascii
        $cmd3 = "UDP <target> <port> <secs>" ascii
        $cmd4 = "KILLALL" ascii
        $cmd5 = "GETSPOOFS" ascii

    condition:
        (elf.type == elf.ET_EXEC or elf.type == elf.ET_DYN)
        and all of ($irc*) and 3 of ($cmd*)
}
