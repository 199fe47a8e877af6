<?php
// Decode an uploaded configuration blob; nothing is evaluated.
$config = json_decode(gzinflate(base64_decode($blob)), true);
echo base64_decode('SGVsbG8sIHdvcmxkIQ==');
