# Download the release notes to a file and show them; nothing is executed.
$wc = New-Object Net.WebClient
$wc.DownloadFile('https://example.com/notes.txt', "$env:TEMP\notes.txt")
Get-Content "$env:TEMP\notes.txt"
