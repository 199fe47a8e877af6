// The EICAR anti-virus test file.
//
// The 68-byte EICAR string must start at offset 0; it may be followed by
// white space only (space, tab, CR, LF, Ctrl-Z), and the file may be at most
// 128 bytes long, as the EICAR definition allows.

rule EICAR_Test_File
{
    meta:
        threat = "EICAR-Test-File"
        severity = "low"
        description = "The EICAR anti-virus test file (harmless, used to check that scanning works)"
        reference = "https://www.eicar.org/download-anti-malware-testfile/"

    strings:
        $eicar = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

    condition:
        $eicar at 0
        and filesize <= 128
        // An empty range is false in YARA, hence the filesize == 68 case.
        // The loop runs over at most 60 bytes: filesize <= 128 is checked first.
        and (
            filesize == 68
            // suppress: potentially_slow_loop
            or for all i in (68 .. filesize - 1) : (
                uint8(i) == 0x20 or uint8(i) == 0x09 or uint8(i) == 0x0D
                or uint8(i) == 0x0A or uint8(i) == 0x1A
            )
        )
}
