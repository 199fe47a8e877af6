// JSP and ASP.NET web shells.

rule Webshell_JSP_Runtime_Exec
{
    meta:
        threat = "Backdoor.JSP.CmdShell"
        severity = "critical"
        description = "JSP page that runs a request parameter as an operating-system command"

    strings:
        $jsp = "<%" ascii
        $exec = /Runtime\s*\.\s*getRuntime\s*\(\s*\)\s*\.\s*exec\s*\(\s*request\s*\.\s*getParameter\s*\(/
        $pb = /new\s+ProcessBuilder\s*\(.{0,80}request\s*\.\s*getParameter\s*\(/

    condition:
        $jsp and ($exec or $pb)
}

rule Webshell_ASPX_Process_Start
{
    meta:
        threat = "Backdoor.ASPX.CmdShell"
        severity = "critical"
        description = "ASP.NET page that starts cmd.exe or PowerShell with arguments taken from the request"

    strings:
        $page = /<%@\s*Page/ nocase
        $start1 = "ProcessStartInfo" ascii
        $start2 = "Process.Start" ascii
        $shell1 = "cmd.exe" ascii nocase
        $shell2 = "powershell" ascii nocase
        $req1 = "Request.Form" ascii
        $req2 = "Request.QueryString" ascii
        $req3 = "Request.Params" ascii
        $req4 = /Request\s*\[\s*"/

    condition:
        $page and any of ($start*) and any of ($shell*) and any of ($req*)
}

rule Webshell_ASPX_China_Chopper
{
    meta:
        threat = "Backdoor.ASPX.ChinaChopper"
        severity = "critical"
        description = "China Chopper server-side stub: evaluates a request item as JScript"

    strings:
        $chopper = /<%@\s*Page\s+Language\s*=\s*"?Jscript"?\s*%>\s*<%\s*eval\s*\(\s*Request\s*(\.Item)?\s*\[/ nocase

    condition:
        $chopper
}
