# Check whether AMSI is available on this host, for the inventory report.
$amsi = Get-Command -ErrorAction SilentlyContinue amsi.dll
Write-Output "AMSI (AmsiUtils) present: $($null -ne $amsi)"
