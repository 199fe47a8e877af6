<%@ Page Language="C#" %>
<%@ Import Namespace="System.Diagnostics" %>
<script runat="server">
// Shows how long the server has been running; takes no input.
void Page_Load(object sender, EventArgs e) {
    var uptime = System.DateTime.Now - Process.GetCurrentProcess().StartTime;
    Response.Write("Up for " + uptime + " as " + Request.Form["name"]);
}
</script>
