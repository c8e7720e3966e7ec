//! Real namespaces and TUNs (needs root, `ip` and iperf3; CI runs as root). Short links only.

use dwcp_wan::emulator::NS_PREFIX;
use dwcp_wan::selfcheck::udp_rtt_ms;
use dwcp_wan::{Emulator, EmulatorConfig, Profile, cleanup_stale, emulator::ip, selfcheck};

fn existing(names: &[String]) -> usize {
    let list = ip(&["netns", "list"]).expect("ip netns list");
    let all: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    names.iter().filter(|n| all.contains(&n.as_str())).count()
}

#[test]
fn rtt_partition_and_cleanup() {
    let emu = Emulator::start(EmulatorConfig {
        hosts: 3,
        profile: Profile::parse("rate=50mbit,rtt=30ms").unwrap(),
        seed: 1,
    })
    .expect("start emulator (root needed)");
    assert_eq!(emu.hosts(), 3);
    let (rtt, answered) = udp_rtt_ms(&emu, 5).unwrap();
    assert_eq!(answered, 5);
    assert!((29.0..34.0).contains(&rtt), "rtt {rtt}");

    emu.set_partitioned(0, 1, true).unwrap();
    let (_, answered) = udp_rtt_ms(&emu, 2).unwrap();
    assert_eq!(answered, 0, "partitioned link must drop everything");
    assert!(emu.stats(0, 1).unwrap().dropped_partition >= 2);
    emu.set_partitioned(0, 1, false).unwrap();
    let (_, answered) = udp_rtt_ms(&emu, 2).unwrap();
    assert_eq!(answered, 2);

    assert!(emu.set_partitioned(0, 7, true).is_err());
    // Namespaces must be gone after drop.
    let names: Vec<String> = (0..3).map(|i| emu.namespace(i).to_string()).collect();
    assert!(names.iter().all(|n| n.starts_with(NS_PREFIX)));
    assert_eq!(existing(&names), 3);
    drop(emu);
    assert_eq!(existing(&names), 0);
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed() {
    // A pid above the kernel's pid_max cannot be running.
    let stale = format!("{NS_PREFIX}99999999-0x0");
    ip(&["netns", "add", &stale]).unwrap();
    let removed = cleanup_stale();
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(!ip(&["netns", "list"]).unwrap().contains(&stale));
}

#[test]
fn selfcheck_matches_a_small_lossy_profile() {
    let p = Profile::parse("rate=20mbit,rtt=40ms,loss=2%").unwrap();
    let r = selfcheck::run(&p, 3, 7).expect("selfcheck (iperf3 needed)");
    for c in &r.checks {
        assert!(c.ok, "{c:?}");
    }
    assert!(r.emulator_cores_at_rate < 1.0);
}
