' Fetch the status page and log it; nothing is saved or run.
Set x = CreateObject("MSXML2.XMLHTTP")
x.Open "GET", "https://intranet.example/status", False
x.Send
WScript.Echo x.ResponseText
