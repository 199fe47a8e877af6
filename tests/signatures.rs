//! The shipped signature database and ruleset loading.
//!
//! Every shipped rule is checked against a sample that must fire it and a
//! benign near-miss that must not. Text samples live in `tests/samples/`
//! (`RULE.hit.EXT`, `RULE.miss.EXT`); PE and ELF samples are built here.

mod common;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use common::*;
use scanserver::signatures::{EXTERNALS, Ruleset, SignatureError};

/// Samples built in code for the rules that look at binary structure.
fn binary_samples() -> BTreeMap<&'static str, (Vec<u8>, Vec<u8>)> {
    let injector = [
        "OpenProcess",
        "VirtualAllocEx",
        "WriteProcessMemory",
        "CreateRemoteThread",
    ];
    let keylogger = [
        "SetWindowsHookExW",
        "GetAsyncKeyState",
        "GetForegroundWindow",
        "ShowWindow",
    ];
    let miner = b"xmrig/6.21 stratum+tcp://pool.example:3333 --donate-level=1 randomx cryptonight";
    let mirai = b"/bin/busybox MIRAI\0/dev/watchdog\0TSource Engine Query\0";
    let bpfdoor = b"/dev/shm/kdmtmpflush\0/var/run/haldrund.pid\0/sbin/udevd -d\0";
    let rootkit = b"/etc/ld.so.preload\0readdir64\0dlsym\0/proc/net/tcp\0HIDE_THIS_SHELL\0";
    let tsunami = b"PRIVMSG %s :\0NOTICE %s :\0TSUNAMI <target> <secs>\0PAN <target> <port> <secs>\0KILLALL\0";
    BTreeMap::from([
        (
            "PE_Process_Injection_Imports",
            (
                PeBuilder::exe().import("KERNEL32.dll", &injector).build(),
                // A debugger opens and reads processes, but never starts
                // threads in them.
                PeBuilder::exe()
                    .import("KERNEL32.dll", &["OpenProcess", "VirtualAllocEx", "ReadProcessMemory"])
                    .build(),
            ),
        ),
        (
            "PE_Keylogger_Imports",
            (
                PeBuilder::exe().import("USER32.dll", &keylogger).build(),
                // A game polls keys and shows windows, but sets no hook.
                PeBuilder::exe()
                    .import("USER32.dll", &["GetAsyncKeyState", "GetForegroundWindow", "ShowWindow"])
                    .build(),
            ),
        ),
        (
            "PE_Ransomware_Shadow_Copy_Wipe",
            (
                PeBuilder::exe()
                    .import("ADVAPI32.dll", &["CryptEncrypt", "CryptAcquireContextW"])
                    .data(b"cmd.exe /c vssadmin delete shadows /all /quiet")
                    .build(),
                // A backup tool lists shadow copies and encrypts its archives.
                PeBuilder::exe()
                    .import("ADVAPI32.dll", &["CryptEncrypt"])
                    .data(b"vssadmin list shadows")
                    .build(),
            ),
        ),
        (
            "PE_Mimikatz",
            (
                PeBuilder::exe()
                    .data(b"mimikatz 2.2.0 (x64) by gentilkiwi\0sekurlsa::logonpasswords\0privilege::debug")
                    .build(),
                // A security tool's help text that names one command.
                PeBuilder::exe()
                    .data(b"Detects mimikatz use of sekurlsa::logonpasswords in event logs")
                    .build(),
            ),
        ),
        (
            "PE_Reflective_Loader",
            (
                PeBuilder::dll().data(b"ReflectiveLoader").build(),
                // The same name in an executable (an analysis tool), not a DLL.
                PeBuilder::exe().data(b"ReflectiveLoader").build(),
            ),
        ),
        (
            "ELF_CoinMiner_XMRig",
            (
                elf(ElfType::Exec, miner),
                // The same strings in an object file, not a program.
                elf(ElfType::Relocatable, miner),
            ),
        ),
        (
            "ELF_Mirai_Botnet",
            (
                elf(ElfType::Exec, mirai),
                // A watchdog daemon that uses busybox.
                elf(ElfType::Exec, b"/bin/busybox sh\0/dev/watchdog\0"),
            ),
        ),
        (
            "ELF_Backdoor_BPFDoor",
            (
                elf(ElfType::Exec, bpfdoor),
                // The real udev daemon.
                elf(ElfType::Exec, b"/sbin/udevd -d\0/run/udev/control\0"),
            ),
        ),
        (
            "ELF_Rootkit_LD_PRELOAD",
            (
                elf(ElfType::Dyn, rootkit),
                // The dynamic loader itself reads /etc/ld.so.preload.
                elf(ElfType::Dyn, b"/etc/ld.so.preload\0dlsym\0readdir64\0"),
            ),
        ),
        (
            "ELF_Tsunami_IRC_Bot",
            (
                elf(ElfType::Exec, tsunami),
                // An IRC client formats the same messages.
                elf(ElfType::Exec, b"PRIVMSG %s :\0NOTICE %s :\0JOIN %s\0"),
            ),
        ),
    ])
}

/// Text samples from `tests/samples`, by rule.
fn text_samples() -> BTreeMap<String, (Vec<u8>, Vec<u8>)> {
    let dir = project_path("tests/samples");
    let mut samples: BTreeMap<String, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '.');
        let (rule, kind) = (parts.next().unwrap(), parts.next().unwrap());
        let bytes = fs::read(&path).unwrap();
        let entry = samples.entry(rule.to_owned()).or_default();
        match kind {
            "hit" => entry.0 = bytes,
            "miss" => entry.1 = bytes,
            other => panic!("{name}: sample kind must be hit or miss, not {other}"),
        }
    }
    samples
}

#[test]
fn every_shipped_rule_fires_on_its_sample_and_not_on_its_near_miss() {
    let ruleset = shipped_ruleset();
    let engine = shipped_engine();
    let mut samples = text_samples();
    samples.extend(binary_samples().into_iter().map(|(k, v)| (k.to_owned(), v)));

    let rules: Vec<_> = ruleset
        .rules()
        .iter()
        .filter(|r| !r.is_private())
        .map(|r| r.identifier().to_owned())
        .collect();
    assert!(
        rules.len() >= 21,
        "at least EICAR and 20 rules ship, found {}",
        rules.len()
    );

    for rule in rules.iter().filter(|r| *r != "EICAR_Test_File") {
        let (hit, miss) = samples
            .get(rule)
            .unwrap_or_else(|| panic!("rule {rule} has no sample"));
        assert!(
            !hit.is_empty() && !miss.is_empty(),
            "{rule} needs a hit and a miss"
        );
        assert_eq!(
            matching_rules(&engine, hit, "sample"),
            vec![rule.clone()],
            "{rule} must fire on its sample, and only it"
        );
        assert_eq!(
            matching_rules(&engine, miss, "sample"),
            Vec::<String>::new(),
            "nothing may fire on the near-miss of {rule}"
        );
    }
    for sample in samples.keys() {
        assert!(rules.contains(sample), "sample for unknown rule {sample}");
    }
}

#[test]
fn every_shipped_rule_carries_threat_severity_and_description() {
    let ruleset = shipped_ruleset();
    for rule in ruleset.rules().iter().filter(|r| !r.is_private()) {
        let keys: Vec<_> = rule.metadata().map(|(k, _)| k).collect();
        for needed in ["threat", "severity", "description"] {
            assert!(
                keys.contains(&needed),
                "{} lacks meta {needed}",
                rule.identifier()
            );
        }
    }
}

#[test]
fn eicar_and_its_allowed_variants_are_found() {
    let engine = shipped_engine();
    let variants: Vec<Vec<u8>> = vec![
        EICAR.to_vec(),
        [EICAR, b"\r\n"].concat(),
        [EICAR, b"\n"].concat(),
        [EICAR, b" \t \x1a"].concat(),
        [EICAR, &[b' '; 60]].concat(),
    ];
    for variant in variants {
        assert_eq!(
            matching_rules(&engine, &variant, "eicar.com"),
            ["EICAR_Test_File"],
            "{:?}",
            String::from_utf8_lossy(&variant)
        );
    }
}

#[test]
fn eicar_outside_its_definition_is_not_the_test_file() {
    let engine = shipped_engine();
    let not_eicar: Vec<Vec<u8>> = vec![
        // Not at offset 0.
        [b" ".as_slice(), EICAR].concat(),
        // Followed by something other than white space.
        [EICAR, b"\nX"].concat(),
        // Longer than 128 bytes.
        [EICAR, &[b' '; 61]].concat(),
        // Truncated.
        EICAR[..67].to_vec(),
    ];
    for data in not_eicar {
        assert!(
            matching_rules(&engine, &data, "x").is_empty(),
            "{:?}",
            String::from_utf8_lossy(&data)
        );
    }
}

#[test]
fn benign_files_are_clean() {
    let engine = shipped_engine();
    let files = [
        project_path("Cargo.toml"),
        project_path("README.md"),
        Path::new("/bin/sh").canonicalize().unwrap(),
    ];
    for file in files {
        let data = fs::read(&file).unwrap();
        assert!(
            matching_rules(&engine, &data, "f").is_empty(),
            "{}",
            file.display()
        );
    }
    assert!(matching_rules(&engine, b"", "empty").is_empty());
}

#[test]
fn a_broken_rule_is_reported_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("good.yar"),
        "rule good { condition: true }\n",
    )
    .unwrap();
    fs::create_dir(dir.path().join("sub")).unwrap();
    fs::write(
        dir.path().join("sub/bad.yar"),
        "rule bad {\n  strings:\n    $a = \"x\"\n  condition:\n    $a and $b\n}\n",
    )
    .unwrap();
    let err = Ruleset::load(dir.path(), None).unwrap_err();
    let SignatureError::Compile(errors) = &err else {
        panic!("expected a compile error, got {err}");
    };
    assert_eq!(errors.len(), 1);
    let error = &errors[0];
    assert!(
        error.file.as_deref().unwrap().ends_with("sub/bad.yar"),
        "{error:?}"
    );
    assert_eq!((error.line, error.column), (Some(5), Some(12)), "{error:?}");
    assert!(error.title.contains("unknown pattern"), "{error:?}");
    assert!(err.to_string().contains("$b"), "{err}");
}

#[test]
fn a_ruleset_that_cannot_match_anything_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // An interrupted update: the files are there, their rules are not.
    fs::write(dir.path().join("empty.yar"), "").unwrap();
    fs::write(
        dir.path().join("base.yar"),
        "private rule base { condition: true }\n",
    )
    .unwrap();
    let err = Ruleset::load(dir.path(), None).unwrap_err();
    assert!(matches!(err, SignatureError::NoRules(_)), "{err}");
    assert!(err.to_string().contains("no rule that can match"), "{err}");

    fs::write(dir.path().join("one.yar"), "rule one { condition: true }\n").unwrap();
    assert_eq!(Ruleset::load(dir.path(), None).unwrap().rule_count(), 2);
}

#[test]
fn each_file_is_its_own_namespace_and_private_rules_are_never_detections() {
    let dir = tempfile::tempdir().unwrap();
    let rule = "private rule marker { strings: $m = \"MARK\" condition: $m }\n\
                rule dup { condition: marker }\n";
    fs::create_dir(dir.path().join("a")).unwrap();
    fs::write(dir.path().join("a/one.yar"), rule).unwrap();
    fs::write(dir.path().join("two.yara"), rule).unwrap();
    fs::write(dir.path().join("notes.txt"), "not a rule").unwrap();
    let engine = engine_with(Ruleset::load(dir.path(), None).unwrap(), Default::default());
    let outcome = engine.scan(&scanserver::engine::ScanJob::bytes(
        b"..MARK..".to_vec(),
        None,
    ));
    let mut found: Vec<_> = outcome
        .verdict
        .detections()
        .iter()
        .map(|d| format!("{}:{}", d.namespace, d.rule))
        .collect();
    found.sort();
    assert_eq!(found, ["a/one.yar:dup", "two.yara:dup"]);
}

#[test]
fn includes_resolve_from_the_including_file_and_stay_inside_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rules");
    fs::create_dir_all(root.join("deep/er")).unwrap();
    fs::write(
        root.join("base.inc"),
        "private rule base { condition: filesize > 0 }\n",
    )
    .unwrap();
    // An include found as YARA-X finds it, wherever it stands on its line,
    // and what follows it on the line kept.
    fs::write(
        root.join("deep/er/uses.yar"),
        "/* shared */ include \"../../base.inc\" rule also { condition: base }\n\
         rule uses { condition: base }\n",
    )
    .unwrap();
    let ruleset = Ruleset::load(&root, None).unwrap();
    let engine = engine_with(ruleset, Default::default());
    let mut matched = matching_rules(&engine, b"x", "x");
    matched.sort();
    assert_eq!(matched, ["also", "uses"]);

    // Changing an included file changes the version.
    let before = Ruleset::load(&root, None).unwrap().version().to_owned();
    fs::write(
        root.join("base.inc"),
        "private rule base { condition: filesize > 1 }\n",
    )
    .unwrap();
    assert_ne!(Ruleset::load(&root, None).unwrap().version(), before);

    fs::write(
        dir.path().join("outside.yar"),
        "rule outside { condition: true }\n",
    )
    .unwrap();
    fs::write(
        root.join("escape.yar"),
        "// include \"commented.yar\"\n/* */ include \"../outside.yar\"\n",
    )
    .unwrap();
    let err = Ruleset::load(&root, None).unwrap_err();
    let SignatureError::Compile(errors) = &err else {
        panic!("{err}")
    };
    assert_eq!(errors[0].file.as_deref(), Some("escape.yar"));
    assert_eq!((errors[0].line, errors[0].column), (Some(2), Some(7)));
    assert!(
        errors[0].title.contains("leaves the ruleset folder"),
        "{err}"
    );
}

/// A FIFO where a rule file should be (included, or named by `--rules`)
/// fails the load at once: it would otherwise hang it, and every reload
/// after it, for ever.
#[test]
fn a_fifo_in_place_of_a_rule_file_fails_the_load() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.inc");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    fs::write(
        dir.path().join("a.yar"),
        "include \"pipe.inc\"\nrule a { condition: true }\n",
    )
    .unwrap();
    for source in [dir.path().to_owned(), fifo.clone()] {
        let included = source == dir.path();
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(Ruleset::load(&source, None).map(|_| ()));
        });
        let result = result
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the load ends");
        let err = result.expect_err("a FIFO is not a rule file");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        // Included, it is named where it is included.
        assert_eq!(err.to_string().contains("a.yar:1:1"), included, "{err}");
    }
    // Named as a rule file, not included: not left out in silence (its
    // rules would be missing from a load that says it succeeded).
    fs::write(dir.path().join("a.yar"), "rule a { condition: true }\n").unwrap();
    let named = std::ffi::CString::new(dir.path().join("b.yar").as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(named.as_ptr(), 0o600) }, 0);
    fs::remove_file(&fifo).unwrap();
    let err = Ruleset::load(dir.path(), None).expect_err("a FIFO named b.yar");
    assert!(
        err.to_string().contains("b.yar: not a regular file"),
        "{err}"
    );
}

/// Hidden entries of the folder are not the ruleset's (an editor's lock
/// file is a link to nowhere, a `.git` folder is not rules); a link to
/// nowhere that is not hidden fails the load, saying what to do; a source
/// file named by itself is compiled whatever its name.
#[test]
fn hidden_entries_are_left_out_and_a_broken_link_is_told() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.yar"), "rule a { condition: true }\n").unwrap();
    symlink("root@host.1234:1700000000", dir.path().join(".#a.yar")).unwrap();
    fs::create_dir(dir.path().join(".git")).unwrap();
    fs::write(dir.path().join(".git/b.yar"), "not a rule").unwrap();
    let ruleset = Ruleset::load(dir.path(), None).unwrap();
    assert_eq!(ruleset.rule_count(), 1);
    let version = ruleset.version().to_owned();
    fs::remove_dir_all(dir.path().join(".git")).unwrap();
    assert_eq!(
        Ruleset::version_of(dir.path()).unwrap(),
        version,
        "not in the version"
    );

    symlink("gone.yar", dir.path().join("b.yar")).unwrap();
    let err = Ruleset::load(dir.path(), None).expect_err("a link to nowhere");
    assert!(err.to_string().contains("b.yar"), "{err}");
    assert!(
        err.to_string().contains("remove it, or mend its target"),
        "{err}"
    );

    let named = dir.path().join("custom.rules");
    fs::write(&named, "rule custom { condition: true }\n").unwrap();
    assert_eq!(Ruleset::load(&named, None).unwrap().rule_count(), 1);
}

/// The errors of a ruleset that must not load: its load's, and the
/// periodic look's at it (which reads it without compiling).
fn refusals(source: &Path) -> [String; 2] {
    [
        Ruleset::load(source, None).unwrap_err().to_string(),
        Ruleset::version_of(source).unwrap_err().to_string(),
    ]
}

/// Includes may nest 32 deep below a rule file, no deeper: YARA-X reads
/// included files itself, a level of recursion each, and a chain of
/// thousands aborted the server on its stack. A chain too deep is refused
/// before YARA-X reads it, with the file it begins at.
#[test]
fn includes_nested_too_deep_are_refused() {
    let chain = |levels: usize| {
        let dir = tempfile::tempdir().unwrap();
        for level in 0..=levels {
            let name = match level {
                0 => "top.yar".to_owned(),
                n => format!("part-{n}.inc"),
            };
            let include = match level < levels {
                true => format!("include \"part-{}.inc\"\n", level + 1),
                false => String::new(),
            };
            let rule = format!("{include}rule r{level} {{ condition: filesize > {level} }}\n");
            fs::write(dir.path().join(name), rule).unwrap();
        }
        dir
    };
    let deepest = chain(32);
    assert_eq!(
        Ruleset::load(deepest.path(), None).unwrap().rule_count(),
        33
    );
    let too_deep = chain(33);
    for err in refusals(too_deep.path()) {
        assert!(
            err.contains("top.yar:1:1") && err.contains("includes nested 33 deep"),
            "{err}"
        );
    }
}

/// A link in the folder must lead to a rule file: one to any other file
/// (a token the server may read, and whoever writes the rules may not)
/// fails the load unread, so its text is in no compile error. A link to a
/// rule file elsewhere, under any name, is that file.
#[test]
fn a_link_to_a_file_that_is_no_rule_file_fails_the_load_unread() {
    use std::os::unix::fs::symlink;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("admin.token");
    fs::write(&secret, "s3cr3t").unwrap();
    let release = outside.path().join("index.yar");
    fs::write(&release, "rule released { condition: true }\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    symlink(&release, dir.path().join("current.yar")).unwrap();
    assert_eq!(Ruleset::load(dir.path(), None).unwrap().rule_count(), 1);

    symlink(&secret, dir.path().join("leak.yar")).unwrap();
    for err in refusals(dir.path()) {
        assert!(
            err.contains("leak.yar") && err.contains("not a rule file"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}

#[test]
fn externals_are_set_per_file() {
    let ruleset = ruleset_from_source(
        r#"
        rule by_name { condition: filename == "invoice.pdf.exe" }
        rule by_extension { condition: extension == ".exe" }
        rule by_folder { condition: filepath contains "Downloads" }
        rule svchost_in_system32 {
            condition: filename == "svchost.exe" and filepath == "C:\\Windows\\System32"
        }
        "#,
    );
    let engine = engine_with(ruleset, Default::default());
    let mut found = matching_rules(&engine, b"x", "/home/u/Downloads/invoice.pdf.exe");
    found.sort();
    assert_eq!(found, ["by_extension", "by_folder", "by_name"]);
    // The next file gets its own values, not the previous file's.
    assert_eq!(
        matching_rules(&engine, b"x", "/srv/report.EXE"),
        ["by_extension"]
    );
    assert!(matching_rules(&engine, b"x", "/srv/report.txt").is_empty());
    // Names from Windows VMs are split at their backslashes.
    let mut found = matching_rules(&engine, b"x", r"C:\Users\u\Downloads\invoice.pdf.exe");
    found.sort();
    assert_eq!(found, ["by_extension", "by_folder", "by_name"]);
    assert_eq!(
        matching_rules(&engine, b"x", r"C:\Windows\System32\svchost.exe"),
        ["by_extension", "svchost_in_system32"]
    );
    assert_eq!(
        matching_rules(&engine, b"x", r"\\fileserver\Downloads\setup.EXE"),
        ["by_extension", "by_folder"]
    );
    assert!(matching_rules(&engine, b"x", r"C:\Users\u\.exe").is_empty());
    // A name relative to a drive's current folder is split after the drive.
    let mut found = matching_rules(&engine, b"x", "C:invoice.pdf.exe");
    found.sort();
    assert_eq!(found, ["by_extension", "by_name"]);
}

#[test]
fn the_version_covers_paths_and_contents() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.yar"), "rule a { condition: true }\n").unwrap();
    let first = Ruleset::load(dir.path(), None).unwrap();
    let again = Ruleset::load(dir.path(), None).unwrap();
    assert_eq!(first.version(), again.version());
    assert_eq!(first.version().len(), 64);
    fs::rename(dir.path().join("a.yar"), dir.path().join("b.yar")).unwrap();
    let renamed = Ruleset::load(dir.path(), None).unwrap();
    assert_ne!(first.version(), renamed.version());
}

/// Rules with includes keep their version wherever their folder lies (an
/// updater unpacking each release beside the last), so their verdicts and
/// compiled form are kept; a ruleset of one file may include rule files
/// only (its folder is not its own: a token file beside it must not be
/// read, nor shown in a compile error); an include whose path an include
/// statement cannot name is refused.
#[test]
fn includes_are_versioned_as_written_and_read_only_where_they_may_be() {
    let dir = tempfile::tempdir().unwrap();
    let release = |name: &str| {
        let root = dir.path().join(name);
        fs::create_dir_all(root.join("lib")).unwrap();
        fs::write(
            root.join("lib/base.yara"),
            "private rule base { condition: true }\n",
        )
        .unwrap();
        fs::write(
            root.join("uses.yar"),
            "include \"lib/base.yara\"\nrule uses { condition: base }\n",
        )
        .unwrap();
        root
    };
    let first = Ruleset::load(&release("2026-12-01"), None).unwrap();
    let second = Ruleset::load(&release("2026-12-07"), None).unwrap();
    assert_eq!(first.version(), second.version());
    let engine = engine_with(second, Default::default());
    assert_eq!(matching_rules(&engine, b"x", "x"), ["uses"]);

    // Which file an include leads to is in the version: a link flipped
    // from one release to another, both in the folder anyway, makes
    // another version.
    let flipped = dir.path().join("flipped");
    for release in ["r1", "r2"] {
        let folder = flipped.join("releases").join(release);
        fs::create_dir_all(&folder).unwrap();
        let rule = format!("private rule base {{ condition: \"{release}\" == \"r1\" }}\n");
        fs::write(folder.join("all.yara"), rule).unwrap();
    }
    let index = "include \".current/all.yara\"\nrule uses { condition: base }\n";
    fs::write(flipped.join("index.yar"), index).unwrap();
    let current = flipped.join(".current");
    std::os::unix::fs::symlink("releases/r1", &current).unwrap();
    let before = Ruleset::load(&flipped, None).unwrap();
    fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink("releases/r2", &current).unwrap();
    let after = Ruleset::load(&flipped, None).unwrap();
    assert_ne!(before.version(), after.version());

    // A rules file reached through a link is named, and includes, from
    // where it lies: a link flipped to another release of the same
    // content makes the same version.
    let linked = dir.path().join("linked");
    for release in ["r1", "r2"] {
        let folder = linked.join(release);
        fs::create_dir_all(&folder).unwrap();
        fs::write(
            folder.join("common.yar"),
            "private rule base { condition: true }\n",
        )
        .unwrap();
        fs::write(
            folder.join("index.yar"),
            "include \"common.yar\"\nrule uses { condition: base }\n",
        )
        .unwrap();
    }
    let etc = linked.join("etc");
    fs::create_dir_all(&etc).unwrap();
    let rules = etc.join("rules.yar");
    std::os::unix::fs::symlink("../r1/index.yar", &rules).unwrap();
    let before = Ruleset::load(&rules, None).unwrap();
    assert_eq!(before.rule_count(), 2);
    fs::remove_file(&rules).unwrap();
    std::os::unix::fs::symlink("../r2/index.yar", &rules).unwrap();
    assert_eq!(
        Ruleset::load(&rules, None).unwrap().version(),
        before.version()
    );
    // A link to a file of a folder ruleset is that file, loaded once.
    std::os::unix::fs::symlink("index.yar", linked.join("r1/latest.yar")).unwrap();
    let count = |release: &str| {
        let ruleset = Ruleset::load(&linked.join(release), None);
        ruleset.unwrap().rule_count()
    };
    assert_eq!(count("r1"), count("r2"));

    let single = dir.path().join("single");
    fs::create_dir_all(&single).unwrap();
    fs::write(single.join("admin.token"), "s3cr3t-token\n").unwrap();
    fs::write(single.join("rules.yar"), "include \"admin.token\"\n").unwrap();
    let err = Ruleset::load(&single.join("rules.yar"), None).unwrap_err();
    assert!(
        err.to_string()
            .contains("may include only .yar and .yara files"),
        "{err}"
    );
    assert!(!err.to_string().contains("s3cr3t"), "{err}");

    // Reached through a link to a folder whose name holds a backslash.
    let odd = dir.path().join("odd");
    fs::create_dir_all(odd.join("vendor\\x")).unwrap();
    fs::write(odd.join("vendor\\x/x.yara"), "rule x { condition: true }\n").unwrap();
    std::os::unix::fs::symlink("vendor\\x", odd.join("lib")).unwrap();
    fs::write(odd.join("top.yar"), "include \"lib/x.yara\"\n").unwrap();
    let err = Ruleset::load(&odd, None).unwrap_err();
    assert!(
        err.to_string().contains("which an include cannot name"),
        "{err}"
    );
    // Nor one whose path is not UTF-8, met in an included file (whose
    // includes YARA-X resolves itself, and could not take it).
    let nested = dir.path().join("nested");
    fs::create_dir_all(&nested).unwrap();
    let bytes = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff.inc");
    fs::write(nested.join(bytes), "rule x { condition: true }\n").unwrap();
    std::os::unix::fs::symlink(bytes, nested.join("l.inc")).unwrap();
    fs::write(nested.join("a.inc"), "include \"l.inc\"\n").unwrap();
    fs::write(nested.join("top.yar"), "include \"a.inc\"\n").unwrap();
    let err = Ruleset::load(&nested, None).unwrap_err();
    assert!(
        err.to_string().contains("which an include cannot name"),
        "{err}"
    );
}

/// A folder and one file of it that includes the others compile to
/// different rules (in the folder, an included file is also a namespace of
/// its own): their versions differ, and neither is served the other's
/// compiled rules from a shared cache.
#[test]
fn a_folder_and_its_including_file_are_different_rulesets() {
    let (rules, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let index = rules.path().join("index.yar");
    fs::write(&index, "include \"x.yar\"\nrule index { condition: x }\n").unwrap();
    fs::write(rules.path().join("x.yar"), "rule x { condition: true }\n").unwrap();
    let file = Ruleset::load(&index, Some(cache.path())).unwrap();
    let folder = Ruleset::load(rules.path(), Some(cache.path())).unwrap();
    assert_ne!(file.version(), folder.version());
    assert!(!folder.from_cache());
    assert_eq!((file.rule_count(), folder.rule_count()), (2, 3));
}

#[test]
fn compiled_rules_are_cached_under_their_version_and_damage_is_ignored() {
    let cache = tempfile::tempdir().unwrap();
    let source = project_path("signatures");
    let compiled = Ruleset::load(&source, Some(cache.path())).unwrap();
    assert!(!compiled.from_cache());
    let cached = Ruleset::load(&source, Some(cache.path())).unwrap();
    assert!(cached.from_cache());
    assert_eq!(cached.version(), compiled.version());
    assert_eq!(cached.rule_count(), compiled.rule_count());
    let engine = engine_with(cached, Default::default());
    assert_eq!(matching_rules(&engine, EICAR, "eicar"), ["EICAR_Test_File"]);

    let file = cache.path().join(format!("{}.yarc", compiled.version()));
    let mut bytes = fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    fs::write(&file, bytes).unwrap();
    let recompiled = Ruleset::load(&source, Some(cache.path())).unwrap();
    assert!(
        !recompiled.from_cache(),
        "a damaged cache file is not trusted"
    );

    // Another version's rules under this version's name (a copy, a
    // backup restored) are not taken for this version's.
    let rules = tempfile::tempdir().unwrap();
    fs::write(rules.path().join("x.yar"), "rule x { condition: true }\n").unwrap();
    let other = Ruleset::load(rules.path(), Some(cache.path())).unwrap();
    let other_file = cache.path().join(format!("{}.yarc", other.version()));
    fs::copy(&other_file, &file).unwrap();
    let reloaded = Ruleset::load(&source, Some(cache.path())).unwrap();
    assert!(
        !reloaded.from_cache(),
        "another version's file is not trusted"
    );
    assert_eq!(reloaded.rule_count(), compiled.rule_count());
}

/// Rules loaded from the compiled-rules cache report the compiler's
/// warnings, as when they were compiled.
#[test]
fn compiled_rules_from_the_cache_keep_their_warnings() {
    let cache = tempfile::tempdir().unwrap();
    let rules = tempfile::tempdir().unwrap();
    let rule = "rule jumps { strings: $b = { 61 [0-4] [0-4] 62 63 64 } condition: $b }";
    fs::write(rules.path().join("jumps.yar"), rule).unwrap();
    let compiled = Ruleset::load(rules.path(), Some(cache.path())).unwrap();
    let cached = Ruleset::load(rules.path(), Some(cache.path())).unwrap();
    assert!(cached.from_cache());
    let codes = |ruleset: &Ruleset| -> Vec<String> {
        ruleset.warnings().iter().map(|w| w.code.clone()).collect()
    };
    assert_eq!(codes(&compiled), ["consecutive_jumps"]);
    assert_eq!(codes(&cached), codes(&compiled));
    assert_eq!(cached.warnings()[0].text, compiled.warnings()[0].text);
}

#[test]
fn precompiled_rules_are_accepted() {
    let ruleset = shipped_ruleset();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yarc");
    fs::write(&file, ruleset.rules().serialize().unwrap()).unwrap();
    let loaded = Ruleset::load(&file, None).unwrap();
    assert_eq!(loaded.rule_count(), ruleset.rule_count());
    // The periodic look, which hashes the file as it reads it, finds the
    // version loaded.
    assert_eq!(Ruleset::version_of(&file).unwrap(), loaded.version());
    let engine = engine_with(loaded, Default::default());
    assert_eq!(matching_rules(&engine, EICAR, "eicar"), ["EICAR_Test_File"]);

    // Rules compiled elsewhere may declare none of the externals, not some.
    let compiled_with = |globals: &[&str]| {
        let mut compiler = yara_x::Compiler::new();
        for global in globals {
            compiler.define_global(global, "").unwrap();
        }
        compiler
            .add_source(r#"rule Eicar { strings: $a = "EICAR-STANDARD" condition: $a }"#)
            .unwrap();
        fs::write(&file, compiler.build().serialize().unwrap()).unwrap();
        Ruleset::load(&file, None)
    };
    let engine = engine_with(compiled_with(&[]).unwrap(), Default::default());
    assert_eq!(matching_rules(&engine, EICAR, "eicar"), ["Eicar"]);
    let err = compiled_with(&["filename", "extension"]).unwrap_err();
    assert!(
        err.to_string()
            .contains("but not filepath, filetype, owner"),
        "{err}"
    );
    assert!(compiled_with(&EXTERNALS).is_ok());
}

/// Public rulesets written by others: every folder below the folders
/// `SCANSERVER_TEST_RULESETS` lists is one set (see the README). Each must
/// load as the server loads a ruleset (a namespace per file, includes from
/// the including file's folder), and the sets known to carry EICAR rules
/// must find it with them. Run on request, as the rulesets are not part of
/// the project.
#[test]
#[ignore = "needs public rulesets: SCANSERVER_TEST_RULESETS=DIR[:DIR...] cargo test --test signatures -- --ignored"]
fn public_rulesets_compile() {
    const EICAR_RULES: &[(&str, &[&str])] = &[
        ("signature-base", &["SUSP_Just_EICAR"]),
        ("atr", &["malw_eicar"]),
        ("binaryalert", &["eicar_av_test", "eicar_substring_test"]),
    ];
    let list = std::env::var_os("SCANSERVER_TEST_RULESETS")
        .expect("SCANSERVER_TEST_RULESETS names the folders of the rulesets");
    let roots: Vec<PathBuf> = std::env::split_paths(&list).collect();
    let mut sets: Vec<PathBuf> = roots
        .iter()
        .map(|root| std::fs::read_dir(root).unwrap_or_else(|e| panic!("{}: {e}", root.display())))
        .flat_map(|entries| entries.map(|e| e.unwrap().path()))
        .filter(|path| path.is_dir())
        .collect();
    sets.sort();
    for set in &sets {
        let ruleset = Ruleset::load(set, None)
            .unwrap_or_else(|e| panic!("{} does not compile: {e}", set.display()));
        assert!(ruleset.rule_count() > 0, "{} has no rule", set.display());
        let name = set.file_name().unwrap().to_str().unwrap();
        if let Some((_, expected)) = EICAR_RULES.iter().find(|(n, _)| *n == name) {
            let engine = engine_with(ruleset, Default::default());
            let found = matching_rules(&engine, EICAR, "eicar.com");
            for rule in *expected {
                assert!(
                    found.iter().any(|f| f == rule),
                    "{name}: {rule} not in {found:?}"
                );
            }
        }
    }
    assert!(!sets.is_empty(), "no ruleset in {roots:?}");
}
