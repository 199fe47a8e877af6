<%@ Page Language="Jscript"%><%Response.Write(Server.HtmlEncode(Request.Item["z"]));%>
