// Ransom notes: the text files ransomware leaves in every folder it
// encrypts. Finding one means encryption has already happened or is running.

private rule Ransom_Payment_Instructions
{
    meta:
        description = "Payment instructions: a crypto-currency wallet or a Tor address to contact"

    strings:
        $btc = /\b(bitcoin|BTC|monero|XMR)\b/ nocase
        $tor1 = /[a-z2-7]{16}([a-z2-7]{40})?\.onion\b/
        $tor2 = "Tor Browser" ascii wide nocase
        $wallet = /\b(bc1|[13])[a-zA-HJ-NP-Z0-9]{25,39}\b/

    condition:
        any of them
}

rule Ransom_Note_Generic
{
    meta:
        threat = "Ransom.Note.Generic"
        severity = "critical"
        description = "Ransom note: says the files were encrypted, how to pay, and threatens their loss"

    strings:
        $enc1 = /(all\s+)?your\s+(important\s+)?(files|data|documents|network)(\s+\w+){0,3}\s+(have\s+been|has\s+been|were|are)\s+(encrypted|locked)/ nocase wide ascii
        $dec1 = /(decrypt(ion|or)?|recover)\s+(your\s+)?(files|data)/ nocase wide ascii
        $threat1 = /(price|cost)\s+(will\s+)?(be\s+)?(doubled|increase)/ nocase wide ascii
        $threat2 = /(files|data|key)\s+will\s+be\s+(deleted|lost|destroyed|published|leaked)/ nocase wide ascii
        $threat3 = /do\s+not\s+(try\s+to\s+)?(rename|modify|decrypt|use\s+third)/ nocase wide ascii

    condition:
        filesize < 200KB and $enc1 and $dec1 and any of ($threat*) and Ransom_Payment_Instructions
}

rule Ransom_Note_WannaCry
{
    meta:
        threat = "Ransom.Win.WannaCry"
        severity = "critical"
        description = "WannaCry (WanaCrypt0r) ransom note or decryptor text"

    strings:
        $s1 = "Ooops, your important files are encrypted." ascii wide
        $s2 = "@WanaDecryptor@" ascii wide
        $s3 = "Wana Decrypt0r" ascii wide nocase
        $s4 = "WANACRY!" ascii

    condition:
        2 of them
}

rule Ransom_Note_LockBit
{
    meta:
        threat = "Ransom.Win.LockBit"
        severity = "critical"
        description = "LockBit ransom note (Restore-My-Files.txt and its leak-site wording)"

    strings:
        $name = "LockBit" ascii wide nocase
        $note1 = "Restore-My-Files.txt" ascii wide nocase
        $note2 = "Your data are stolen and encrypted" ascii wide nocase
        $note3 = "The data will be published on TOR website" ascii wide nocase
        $note4 = "would you like to earn millions of dollars" ascii wide nocase

    condition:
        $name and 2 of ($note*)
}
