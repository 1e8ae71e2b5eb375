//! Real-client checks, each taking the server [`Factory`]. Each starts its own server(s),
//! runs clients with timeouts and finally stops the server with SIGTERM, expecting exit 0.

use super::*;

const MIB: u64 = 1 << 20;

fn cfg(size: u64) -> ServerConfig {
    ServerConfig {
        size,
        read_only: false,
    }
}

fn stop_ok(s: RunningServer) {
    let st = s.stop();
    assert!(st.success(), "server exit status after SIGTERM: {st}");
}

/// nbdinfo: size, --list, --map (holes vs data after a write).
pub fn nbdinfo(f: Factory) {
    if !have_tool("nbdinfo") || !have_tool("qemu-io") {
        return;
    }
    let size = 32 * MIB;
    let s = RunningServer::start(f, &cfg(size), false);
    let uri = s.uri();
    assert_eq!(
        run_ok("nbdinfo", &["--size", &uri], 20).trim(),
        size.to_string()
    );
    let list = run_ok("nbdinfo", &["--list", &uri], 20);
    assert!(list.contains(&format!("export-size: {size}")), "{list}");
    assert!(list.contains("base:allocation"), "{list}");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1M 2M", &uri],
        30,
    );
    let map = run_ok("nbdinfo", &["--map", &uri], 20);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let total: u64 = rows.iter().map(|r| r[1].parse::<u64>().unwrap()).sum();
    assert_eq!(total, size, "{map}");
    let covers_data = rows.iter().any(|r| {
        let (o, l): (u64, u64) = (r[0].parse().unwrap(), r[1].parse().unwrap());
        o <= MIB && o + l >= 3 * MIB && r[2] == "0"
    });
    assert!(covers_data, "written range not reported as data:\n{map}");
    assert!(
        map.contains("hole,zero") || map.contains("zero"),
        "no zero extents:\n{map}"
    );
    stop_ok(s);
}

/// qemu-img info/map/compare/convert and qemu-io data operations.
pub fn qemu(f: Factory) {
    if !have_tool("qemu-img") || !have_tool("qemu-io") {
        return;
    }
    let size = 32 * MIB;
    let s = RunningServer::start(f, &cfg(size), false);
    let uri = s.uri();
    let info = run_ok("qemu-img", &["info", "--output=json", &uri], 30);
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );
    let ops = [
        "write -P 0xab 1M 2M",
        "read -P 0xab 1M 2M",
        "write -P 0x11 1k 1k",
        "write -P 0x22 5k 3k",
        "read -P 0x11 1k 1k",
        "read -P 0x22 5k 3k",
        "read -P 0 0 1k",
        "write -P 0x33 32764k 4k",
        "read -P 0x33 32764k 4k",
        "write -z 8M 1M",
        "read -P 0 8M 1M",
        "write -P 0x44 12M 1M",
        "write -z -u 12M 1M",
        "read -P 0 12M 1M",
        "discard 16M 1M",
        "aio_write -P 0x55 20M 64k",
        "aio_write -P 0x66 21M 64k",
        "aio_flush",
        "read -P 0x55 20M 64k",
        "read -P 0x66 21M 64k",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for op in &ops {
        args.extend(["-c", op]);
    }
    args.push(&uri);
    let out = run_ok("qemu-io", &args, 60);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    let map = run_ok("qemu-img", &["map", "--output=json", &uri], 30);
    assert!(map.contains("\"data\": true"), "{map}");
    assert!(
        map.contains("\"data\": false"),
        "map shows no holes:\n{map}"
    );
    assert!(
        map.contains("\"start\": 1048576, \"length\": 2097152"),
        "{map}"
    );
    // convert a local image in, compare both ways.
    let img = s.dir.0.join("src.img");
    pattern_file(&img, size as usize, 42);
    let img_s = img.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", img_s, &uri],
        60,
    );
    let cmp = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, img_s],
        60,
    );
    assert!(cmp.contains("identical"), "{cmp}");
    stop_ok(s);
}

/// nbdcopy into and out of the server (multi-conn), byte-compared.
pub fn nbdcopy(f: Factory) {
    if !have_tool("nbdcopy") {
        return;
    }
    let size = 32 * MIB;
    let s = RunningServer::start(f, &cfg(size), false);
    let uri = s.uri();
    let src = s.dir.0.join("src.img");
    let dst = s.dir.0.join("dst.img");
    pattern_file(&src, size as usize, 7);
    let o = run("nbdcopy", &["-v", src.to_str().unwrap(), &uri], 120);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "nbdcopy in failed: {log}");
    let conns: u32 = log
        .lines()
        .find_map(|l| l.split("connections=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("nbdcopy -v printed no connections=");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    assert_eq!(conns, cpus.clamp(1, 4), "multi-conn not used");
    run_ok("nbdcopy", &["--flush", &uri, dst.to_str().unwrap()], 120);
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert!(a == b, "nbdcopy round trip differs");
    stop_ok(s);
}

/// fio's nbd engine with crc32c verification, 2 jobs × iodepth 16.
pub fn fio(f: Factory) {
    if !have_tool("fio") {
        return;
    }
    let s = RunningServer::start(f, &cfg(32 * MIB), false);
    let uri = format!("--uri={}", s.uri());
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=16m",
            "--offset_increment=16m",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // Otherwise fio leaves *-verify.state files in the working directory.
            "--verify_state_save=0",
            "--group_reporting",
        ],
        120,
    );
    assert!(out.contains("err= 0"), "{out}");
    stop_ok(s);
}

/// `nbd-client -l` (LIST + ABORT, no kernel module needed).
pub fn nbd_client_list(f: Factory) {
    if !have_tool("nbd-client") {
        return;
    }
    let s = RunningServer::start(f, &cfg(MIB), false);
    let port = s.port().to_string();
    let out = run_ok("nbd-client", &["-l", "127.0.0.1", &port], 20);
    let names: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("Negotiation"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(!names.is_empty(), "no export listed: {out}");
    stop_ok(s);
}

/// Bad requests through libnbd with strict mode off: exact errnos, connection stays usable.
pub fn negative(f: Factory) {
    if !have_python_nbd() {
        return;
    }
    let size = 64 * MIB;
    let rw = RunningServer::start(f, &cfg(size), false);
    let ro_cfg = ServerConfig {
        size,
        read_only: true,
    };
    let ro = RunningServer::start(f, &ro_cfg, true);
    let script = rw.dir.0.join("negative.py");
    std::fs::write(&script, include_str!("negative.py")).unwrap();
    let o = run(
        "/usr/bin/python3",
        &[
            script.to_str().unwrap(),
            &rw.uri(),
            &ro.uri(),
            &size.to_string(),
        ],
        120,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    println!("{out}");
    assert!(
        o.status.success() && out.contains("ALL OK"),
        "negative checks failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // nbdsh, as an operator would run it, still gets served afterwards.
    if have_tool("nbdsh") {
        let out = run_ok("nbdsh", &["-u", &rw.uri(), "-c", "print(h.get_size())"], 30);
        assert_eq!(out.trim(), size.to_string());
    }
    stop_ok(rw);
    stop_ok(ro);
}

/// Unix socket transport with nbdinfo and qemu-io.
pub fn unix_socket(f: Factory) {
    if !have_tool("nbdinfo") || !have_tool("qemu-io") {
        return;
    }
    let s = RunningServer::start(f, &cfg(8 * MIB), true);
    let uri = s.uri();
    assert_eq!(
        run_ok("nbdinfo", &["--size", &uri], 20).trim(),
        (8 * MIB).to_string()
    );
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 4k 64k",
            "-c",
            "read -P 0x77 4k 64k",
            &uri,
        ],
        30,
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    stop_ok(s);
}
