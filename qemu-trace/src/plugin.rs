//! The QEMU side: the plugin entry point and callbacks.
//!
//! Why a hand-written binding of QEMU's C plugin API and not the
//! `qemu-plugin` crate: Debian's QEMU 7.2 speaks API version 1, and the
//! crate's version-1 bindings also name functions that only QEMU 8.x added;
//! a plugin that references a symbol its QEMU lacks fails to load (QEMU
//! opens plugins with every symbol resolved). The dozen functions below are
//! all 7.2 has and all we need (`nm -D qemu-system-x86_64` lists them).

use crate::decode::{classify, Kind};
use crate::tracer::{Tracer, Window};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;

type PluginId = u64;
type MemInfo = u32;
#[repr(C)]
struct Tb {
    _private: [u8; 0],
}
#[repr(C)]
struct Insn {
    _private: [u8; 0],
}
#[repr(C)]
struct HwAddr {
    _private: [u8; 0],
}

/// `enum qemu_plugin_cb_flags`: the callbacks read no registers.
const CB_NO_REGS: c_int = 0;
/// `enum qemu_plugin_mem_rw`: stores only.
const MEM_W: c_int = 2;

extern "C" {
    fn qemu_plugin_register_vcpu_tb_trans_cb(id: PluginId, cb: extern "C" fn(PluginId, *mut Tb));
    fn qemu_plugin_register_atexit_cb(
        id: PluginId,
        cb: extern "C" fn(PluginId, *mut c_void),
        userdata: *mut c_void,
    );
    fn qemu_plugin_tb_n_insns(tb: *const Tb) -> usize;
    fn qemu_plugin_tb_get_insn(tb: *const Tb, idx: usize) -> *mut Insn;
    fn qemu_plugin_insn_data(insn: *const Insn) -> *const c_void;
    fn qemu_plugin_insn_size(insn: *const Insn) -> usize;
    fn qemu_plugin_insn_vaddr(insn: *const Insn) -> u64;
    fn qemu_plugin_register_vcpu_insn_exec_cb(
        insn: *mut Insn,
        cb: extern "C" fn(c_uint, *mut c_void),
        flags: c_int,
        userdata: *mut c_void,
    );
    fn qemu_plugin_register_vcpu_mem_cb(
        insn: *mut Insn,
        cb: extern "C" fn(c_uint, MemInfo, u64, *mut c_void),
        flags: c_int,
        rw: c_int,
        userdata: *mut c_void,
    );
    fn qemu_plugin_get_hwaddr(info: MemInfo, vaddr: u64) -> *const HwAddr;
    fn qemu_plugin_hwaddr_is_io(h: *const HwAddr) -> bool;
    fn qemu_plugin_hwaddr_phys_addr(h: *const HwAddr) -> u64;
    fn qemu_plugin_mem_size_shift(info: MemInfo) -> c_uint;
    fn qemu_plugin_mem_is_store(info: MemInfo) -> bool;
}

/// The API version this plugin is built for (QEMU 7.2's `QEMU_PLUGIN_VERSION`).
#[no_mangle]
#[used]
pub static qemu_plugin_version: c_int = 1;

struct State {
    tracer: Tracer<File>,
    out: PathBuf,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn with_state(f: impl FnOnce(&mut State)) {
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = g.as_mut() {
        f(s)
    }
}

/// Entry point: `-plugin libqemu_trace.so,out=DIR,ram=BYTES,marker=FILE,pmem0=FILE[,pmem1=FILE...]`.
///
/// # Safety
/// Called by QEMU with `argc` valid C strings in `argv`.
#[no_mangle]
pub unsafe extern "C" fn qemu_plugin_install(
    id: PluginId,
    _info: *const c_void,
    argc: c_int,
    argv: *const *const c_char,
) -> c_int {
    let mut args = Vec::new();
    for i in 0..argc.max(0) as usize {
        // SAFETY: QEMU passes `argc` valid NUL-terminated strings.
        let s = unsafe { CStr::from_ptr(*argv.add(i)) };
        args.push(s.to_string_lossy().into_owned());
    }
    match install(&args) {
        Ok(state) => {
            *STATE.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
            // SAFETY: registering callbacks with the id QEMU gave us.
            unsafe {
                qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
                qemu_plugin_register_atexit_cb(id, at_exit, std::ptr::null_mut());
            }
            0
        }
        Err(e) => {
            eprintln!("@@QTRACE-ERROR {e}");
            -1
        }
    }
}

fn install(args: &[String]) -> Result<State, String> {
    let mut out = None;
    let mut ram = None;
    let mut marker = None;
    let mut pmem: Vec<(usize, File)> = Vec::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("argument `{a}` is not key=value"))?;
        let open = |v: &str| File::open(v).map_err(|e| format!("opening {v}: {e}"));
        match k {
            "out" => out = Some(PathBuf::from(v)),
            "ram" => ram = Some(v.parse::<u64>().map_err(|e| format!("ram={v}: {e}"))?),
            "marker" => marker = Some(open(v)?),
            _ => match k.strip_prefix("pmem").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => pmem.push((n, open(v)?)),
                None => return Err(format!("unknown argument `{k}`")),
            },
        }
    }
    pmem.sort_by_key(|(n, _)| *n);
    if pmem.iter().enumerate().any(|(i, (n, _))| i != *n) {
        return Err("pmemN arguments must number 0, 1, ... without gaps".into());
    }
    let out = out.ok_or("out=DIR missing")?;
    std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    Ok(State {
        tracer: Tracer::new(
            ram.ok_or("ram=BYTES missing")?,
            marker.ok_or("marker=FILE missing")?,
            pmem.into_iter().map(|(_, f)| f).collect(),
        ),
        out,
    })
}

extern "C" fn tb_trans(_id: PluginId, tb: *mut Tb) {
    // SAFETY: `tb` is the translation block QEMU hands this callback; its
    // instructions and their bytes are valid during the callback.
    unsafe {
        for i in 0..qemu_plugin_tb_n_insns(tb) {
            let insn = qemu_plugin_tb_get_insn(tb, i);
            let data = qemu_plugin_insn_data(insn) as *const u8;
            let bytes = std::slice::from_raw_parts(data, qemu_plugin_insn_size(insn));
            if let Some(kind) = classify(bytes) {
                let cb: extern "C" fn(c_uint, *mut c_void) = match kind {
                    Kind::Sfence => exec_sfence,
                    Kind::Mfence => exec_mfence,
                    Kind::Clwb => exec_clwb,
                    Kind::Clflush => exec_clflush,
                    Kind::Clflushopt => exec_clflushopt,
                };
                // The pc travels as the userdata pointer's value.
                let pc = qemu_plugin_insn_vaddr(insn);
                qemu_plugin_register_vcpu_insn_exec_cb(insn, cb, CB_NO_REGS, pc as *mut c_void);
            }
            qemu_plugin_register_vcpu_mem_cb(insn, mem_cb, CB_NO_REGS, MEM_W, std::ptr::null_mut());
        }
    }
}

fn exec(kind: Kind, pc: *mut c_void) {
    with_state(|s| s.tracer.insn(kind, pc as u64));
}
extern "C" fn exec_sfence(_: c_uint, pc: *mut c_void) {
    exec(Kind::Sfence, pc)
}
extern "C" fn exec_mfence(_: c_uint, pc: *mut c_void) {
    exec(Kind::Mfence, pc)
}
extern "C" fn exec_clwb(_: c_uint, pc: *mut c_void) {
    exec(Kind::Clwb, pc)
}
extern "C" fn exec_clflush(_: c_uint, pc: *mut c_void) {
    exec(Kind::Clflush, pc)
}
extern "C" fn exec_clflushopt(_: c_uint, pc: *mut c_void) {
    exec(Kind::Clflushopt, pc)
}

extern "C" fn mem_cb(_vcpu: c_uint, info: MemInfo, vaddr: u64, _: *mut c_void) {
    // SAFETY: called by QEMU right after the access `info` describes.
    let (io, phys, size) = unsafe {
        if !qemu_plugin_mem_is_store(info) {
            return;
        }
        let h = qemu_plugin_get_hwaddr(info, vaddr);
        if h.is_null() {
            return;
        }
        (
            qemu_plugin_hwaddr_is_io(h),
            qemu_plugin_hwaddr_phys_addr(h),
            1u64 << qemu_plugin_mem_size_shift(info),
        )
    };
    with_state(|s| {
        if let Some(w) = s.tracer.store(phys, size, io) {
            if let Err(e) = write_window(&s.out, &w) {
                s.tracer.errors.push(e.clone());
                eprintln!("@@QTRACE-ERROR {e}");
            }
        }
    });
}

fn write_window(out: &std::path::Path, w: &Window) -> Result<(), String> {
    let bin = out.join(format!("trace-{}.bin", w.device));
    std::fs::write(&bin, w.trace.encode())
        .map_err(|e| format!("writing {}: {e}", bin.display()))?;
    let c = &w.counts;
    let wbs: Vec<String> = w
        .write_backs
        .iter()
        .map(|b| format!("[\"{}\",{},{}]", b.kind.name(), b.pc, b.position))
        .collect();
    let json = format!(
        "{{\"device\":{},\"base\":{},\"events\":{},\"stores\":{},\"bytes\":{},\"sfence\":{},\"mfence\":{},\"clwb\":{},\"clflush\":{},\"clflushopt\":{},\"flush_requests\":{},\"barriers\":{},\"write_backs\":[{}]}}\n",
        w.device, w.base, w.trace.len(), c.stores, c.bytes, c.sfence, c.mfence, c.clwb, c.clflush,
        c.clflushopt, c.flush_requests, c.barriers, wbs.join(",")
    );
    let path = out.join(format!("trace-{}.json", w.device));
    std::fs::write(&path, json).map_err(|e| format!("writing {}: {e}", path.display()))
}

extern "C" fn at_exit(_id: PluginId, _: *mut c_void) {
    with_state(|s| {
        let t = &s.tracer;
        let bases: Vec<String> = t
            .devices
            .iter()
            .map(|d| d.base.map_or("null".into(), |b| b.to_string()))
            .collect();
        let errors: Vec<String> = t
            .errors
            .iter()
            .map(|e| format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "'")))
            .collect();
        let json = format!(
            "{{\"marker_base\":{},\"bases\":[{}],\"markers\":{},\"other_stores\":{},\"errors\":[{}]}}\n",
            t.marker_base().map_or("null".into(), |b| b.to_string()),
            bases.join(","),
            t.markers,
            t.other_stores,
            errors.join(",")
        );
        let _ = std::fs::write(s.out.join("plugin.json"), json);
    });
}
