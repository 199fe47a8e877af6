@echo off
rem Nightly report, run visibly with the signed script.
powershell.exe -NoProfile -File C:\Scripts\nightly-report.ps1 -Encoding UTF8
