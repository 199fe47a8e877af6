<%@ page import="java.io.*" %>
<%
    // Health page: runs a fixed diagnostic, reads the user name from the request.
    String user = request.getParameter("user");
    Process p = Runtime.getRuntime().exec(new String[] {"/usr/bin/uptime"});
    out.println("Hello " + user);
%>
