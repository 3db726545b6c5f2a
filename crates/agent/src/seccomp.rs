//! The seccomp filters every `local` sandbox command runs under, in the spirit of Docker's
//! default profile (moby `profiles/seccomp/default.json`) for a container without
//! `CAP_SYS_ADMIN`: the system calls that reach kernel-wide state or other namespaces are
//! refused with `EPERM` (module and kexec loading, mounts, namespaces, keyrings, `ptrace` and
//! cross-process memory access, `bpf`, `perf_event_open`, `userfaultfd`, `io_uring`, clock and
//! swap changes, …), and so is setting the set-user-id or set-group-id bit with
//! `chmod`/`fchmod`/`fchmodat`/`fchmodat2`, so no setuid file can be made. `clone` with a
//! namespace flag is refused; `clone3`, whose flags a filter cannot read, answers `ENOSYS` so
//! the C library falls back to `clone` (as Docker does). On x86-64 the x32 system-call range
//! answers `ENOSYS`, so the same calls cannot be reached under other numbers.
//!
//! bubblewrap loads each program (`--add-seccomp-fd`) right before it executes the command,
//! after its own setup; the programs are compiled once with `seccompiler`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `fchmodat2(2)` (Linux 6.6), the same number on every architecture.
const SYS_FCHMODAT2: i64 = 452;

/// System calls refused outright with `EPERM`.
fn refused() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_acct,
        libc::SYS_add_key,
        libc::SYS_bpf,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_settime,
        libc::SYS_delete_module,
        libc::SYS_finit_module,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fsopen,
        libc::SYS_fspick,
        libc::SYS_get_mempolicy,
        libc::SYS_init_module,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_io_uring_setup,
        libc::SYS_kcmp,
        libc::SYS_kexec_file_load,
        libc::SYS_kexec_load,
        libc::SYS_keyctl,
        libc::SYS_lookup_dcookie,
        libc::SYS_mbind,
        libc::SYS_mount,
        libc::SYS_mount_setattr,
        libc::SYS_move_mount,
        libc::SYS_move_pages,
        libc::SYS_name_to_handle_at,
        libc::SYS_open_by_handle_at,
        libc::SYS_open_tree,
        libc::SYS_perf_event_open,
        libc::SYS_pidfd_getfd,
        libc::SYS_pivot_root,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_ptrace,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_reboot,
        libc::SYS_request_key,
        libc::SYS_set_mempolicy,
        libc::SYS_setns,
        libc::SYS_settimeofday,
        libc::SYS_swapoff,
        libc::SYS_swapon,
        libc::SYS_syslog,
        libc::SYS_umount2,
        libc::SYS_unshare,
        libc::SYS_userfaultfd,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        libc::SYS_ioperm,
        libc::SYS_iopl,
        libc::SYS_nfsservctl,
        libc::SYS_sysfs,
        libc::SYS__sysctl,
        libc::SYS_uselib,
        libc::SYS_ustat,
    ]);
    calls
}

/// A rule matching when argument `arg` has any bit of `bits` set (one rule per bit, since
/// rules are alternatives and conditions within one are all required).
fn any_bit(arg: u8, bits: &[u64]) -> Vec<SeccompRule> {
    bits.iter()
        .map(|bit| {
            let condition = SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(*bit),
                *bit,
            )
            .expect("a valid condition");
            SeccompRule::new(vec![condition]).expect("a valid rule")
        })
        .collect()
}

fn arch() -> Option<TargetArch> {
    std::env::consts::ARCH.try_into().ok()
}

/// The programs, in the order they are loaded: the `EPERM` filter, the `clone3` one and, on
/// x86-64, the x32 guard; each as the raw bytes of its `struct sock_filter` array, the format
/// `--add-seccomp-fd` reads. Empty on an architecture `seccompiler` does not know.
pub(crate) fn programs() -> Vec<Vec<u8>> {
    let Some(arch) = arch() else {
        tracing::warn!(
            arch = std::env::consts::ARCH,
            "no seccomp filter for this architecture: sandboxes run without one"
        );
        return Vec::new();
    };
    let setid = [libc::S_ISUID as u64, libc::S_ISGID as u64];
    let namespaces = [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWCGROUP,
        libc::CLONE_NEWTIME,
    ]
    .map(|f| f as u64);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        refused().into_iter().map(|nr| (nr, Vec::new())).collect();
    // chmod(path, mode) exists on x86-64 only; fchmod(fd, mode); fchmodat(dirfd, path,
    // mode[, flags]) and fchmodat2 everywhere.
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc::SYS_chmod, any_bit(1, &setid));
    rules.insert(libc::SYS_fchmod, any_bit(1, &setid));
    rules.insert(libc::SYS_fchmodat, any_bit(2, &setid));
    rules.insert(SYS_FCHMODAT2, any_bit(2, &setid));
    // clone's first argument is its flags on every architecture Linux supports here.
    rules.insert(libc::SYS_clone, any_bit(0, &namespaces));
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .and_then(BpfProgram::try_from);
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .and_then(BpfProgram::try_from);
    let mut out: Vec<Vec<u8>> = [deny, clone3]
        .into_iter()
        .map(|p| bytes(&p.expect("the sandbox's seccomp filter compiles")))
        .collect();
    if arch == TargetArch::x86_64 {
        out.push(x32_guard());
    }
    out
}

/// A classic BPF program answering `ENOSYS` for the x32 ABI's system calls (numbers with
/// bit 30 set) and allowing everything else, so a denied call cannot be reached by its x32
/// number.
fn x32_guard() -> Vec<u8> {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    let program = [
        // A = seccomp_data.nr (offset 0)
        seccompiler::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        // if A >= X32_SYSCALL_BIT: next, else skip one
        seccompiler::sock_filter {
            code: JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        seccompiler::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        seccompiler::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    bytes(&program)
}

/// The program as the kernel's `struct sock_filter` array in native byte order.
fn bytes(program: &[seccompiler::sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for insn in program {
        out.extend_from_slice(&insn.code.to_ne_bytes());
        out.push(insn.jt);
        out.push(insn.jf);
        out.extend_from_slice(&insn.k.to_ne_bytes());
    }
    out
}
