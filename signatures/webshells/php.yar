// PHP web shells: code that runs what an HTTP request sends it.

rule Webshell_PHP_Eval_Request
{
    meta:
        threat = "Backdoor.PHP.WebShell"
        severity = "critical"
        description = "PHP that evaluates or asserts a request parameter directly (one-line web shell)"

    strings:
        $php = "<?" ascii
        $eval = /(eval|assert|create_function)\s*\(\s*(stripslashes\s*\(\s*)?\$_(POST|GET|REQUEST|COOKIE|SERVER)\s*\[/ nocase

    condition:
        $php and $eval
}

rule Webshell_PHP_Obfuscated_Eval
{
    meta:
        threat = "Backdoor.PHP.ObfuscatedShell"
        severity = "high"
        description = "PHP that evaluates code hidden behind decoding layers (base64, gzinflate, str_rot13)"

    strings:
        $php = "<?" ascii
        $layers = /eval\s*\(\s*(gzinflate|gzuncompress|gzdecode|str_rot13|base64_decode)\s*\(\s*(gzinflate|gzuncompress|gzdecode|str_rot13|base64_decode)\s*\(/ nocase
        $long_b64 = /eval\s*\(\s*base64_decode\s*\(\s*['"][A-Za-z0-9+\/=]{200,}['"]/ nocase

    condition:
        $php and ($layers or $long_b64)
}

rule Webshell_PHP_Command_Exec
{
    meta:
        threat = "Backdoor.PHP.CmdShell"
        severity = "critical"
        description = "PHP that hands a request parameter to a system shell"

    strings:
        $php = "<?" ascii
        $exec = /(system|passthru|shell_exec|exec|popen|proc_open|pcntl_exec)\s*\(\s*\$_(POST|GET|REQUEST|COOKIE)\s*\[/ nocase
        $backtick = /`\s*\$_(POST|GET|REQUEST)\s*\[/ nocase

    condition:
        $php and ($exec or $backtick)
}
