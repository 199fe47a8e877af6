<?php
eval(gzinflate(base64_decode('S0lNzshXSM7PS0lNLlEoSS0uUcjMyy/NyQEA')));
?>
