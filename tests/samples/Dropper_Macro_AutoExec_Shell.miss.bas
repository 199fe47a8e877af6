Attribute VB_Name = "ThisDocument"
Sub AutoOpen()
    ' Fill in today's date and refresh the table of contents.
    ActiveDocument.Bookmarks("Date").Range.Text = Format(Date, "yyyy-mm-dd")
    ActiveDocument.TablesOfContents(1).Update
End Sub
