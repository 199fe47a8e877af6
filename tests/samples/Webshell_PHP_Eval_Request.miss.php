<?php
// A template engine that evaluates its own compiled templates.
$code = file_get_contents(__DIR__ . '/cache/compiled.php');
$name = htmlspecialchars($_POST['name']);
eval('?>' . $code);
