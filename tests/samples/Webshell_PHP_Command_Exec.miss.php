<?php
// Maintenance page: runs a fixed command, escapes what it prints.
$output = shell_exec('uptime');
$host = escapeshellarg($_GET['host'] ?? 'localhost');
echo htmlspecialchars($output);
