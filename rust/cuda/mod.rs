//! The CUDA path: kernels in `cuda/*.cu`, compiled at run time with NVRTC and launched with the
//! driver API on the caller's (torch's) stream, in the device's primary context.
//!
//! Everything is loaded at run time through cudarc's `dynamic-loading`, so the crate builds and
//! imports on machines without CUDA. cudarc panics when a library is missing; every entry point
//! here checks for the library first and runs the FFI calls under `catch_unwind`, so a missing
//! driver or NVRTC is a [`CudaError::Unavailable`], never a panic across the FFI boundary.
//!
//! * Sources are embedded at build time ([`SOURCES`]) and compiled on first use to a cubin for
//!   the device's own architecture (a driver may reject PTX from a newer NVRTC; a cubin of the
//!   same major CUDA version loads). Cubins are cached per architecture, modules per device.
//! * The context is the device's primary context, the one torch's runtime uses: retained once
//!   and never released or destroyed, pushed around each call and popped after.
//! * Pointers and streams come from the caller (torch's `data_ptr()` and
//!   `current_stream().cuda_stream`); nothing here allocates device memory or synchronises.
//!
//! The launchers of each family sit in [`importance`] and [`kvscore`].

pub mod importance;
pub mod kvscore;

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys as cu;
use cudarc::nvrtc::sys as nv;

/// Every CUDA source, by family name, embedded at build time.
pub const SOURCES: &[(&str, &str)] = &[
    ("importance", include_str!("../../cuda/importance.cu")),
    ("kvscore", include_str!("../../cuda/kvscore.cu")),
];

/// What can go wrong on the CUDA path.
#[derive(Debug, Clone, PartialEq)]
pub enum CudaError {
    /// A bad argument (maps to `ValueError`/`TypeError`).
    Arg(crate::Error),
    /// libnvrtc or the driver library cannot be loaded, or no device: `RuntimeError`.
    Unavailable(String),
    /// NVRTC rejected a source; carries the compiler log.
    Compile {
        source: String,
        arch: u32,
        log: String,
    },
    /// A driver or NVRTC call failed.
    Call { call: &'static str, code: String },
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::Arg(e) => write!(f, "{e}"),
            CudaError::Unavailable(m) => write!(f, "{m}"),
            CudaError::Compile { source, arch, log } => {
                write!(
                    f,
                    "NVRTC could not compile cuda/{source}.cu for sm_{arch}:\n{log}"
                )
            }
            CudaError::Call { call, code } => write!(f, "CUDA: {call} failed: {code}"),
        }
    }
}

impl std::error::Error for CudaError {}

impl From<crate::Error> for CudaError {
    fn from(e: crate::Error) -> Self {
        CudaError::Arg(e)
    }
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Run FFI calls, turning any panic inside cudarc (a missing symbol) into an error.
fn guarded<T>(what: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(CudaError::Unavailable(format!("{what}: {msg}")))
        }
    }
}

// ------------------------------------------------------------------------------------------
// NVRTC
// ------------------------------------------------------------------------------------------

fn nvrtc_check(r: nv::nvrtcResult, call: &'static str) -> Result<()> {
    if r == nv::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a static string for every result code.
    let name = unsafe { CStr::from_ptr(nv::nvrtcGetErrorString(r)) };
    Err(CudaError::Call {
        call,
        code: name.to_string_lossy().into_owned(),
    })
}

/// Load libnvrtc (already loaded by `forgetcore._cuda` from torch's nvidia wheels, or found on
/// the loader path) or say clearly that it is missing.
fn ensure_nvrtc() -> Result<()> {
    static PRESENT: OnceLock<()> = OnceLock::new();
    if PRESENT.get().is_some() {
        return Ok(());
    }
    // SAFETY: only tries to dlopen the candidate names.
    if !unsafe { nv::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "libnvrtc: not found. It ships in torch's CUDA wheels (site-packages/nvidia/*/lib); \
             import forgetcore._cuda (which loads it from there) or set FORGETCORE_NVRTC to its path"
                .into(),
        ));
    }
    let _ = PRESENT.set(());
    Ok(())
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    guarded("libnvrtc", || {
        ensure_nvrtc()?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-pointers to live integers.
        nvrtc_check(
            unsafe { nv::nvrtcVersion(&mut major, &mut minor) },
            "nvrtcVersion",
        )?;
        Ok((major, minor))
    })
}

/// Architectures (as 80, 90, ...) this NVRTC can compile for.
pub fn supported_archs() -> Result<Vec<u32>> {
    guarded("libnvrtc", || {
        ensure_nvrtc()?;
        let mut n = 0;
        // SAFETY: out-pointer, then a buffer of exactly the reported size.
        nvrtc_check(
            unsafe { nv::nvrtcGetNumSupportedArchs(&mut n) },
            "nvrtcGetNumSupportedArchs",
        )?;
        let mut archs = vec![0i32; n.max(0) as usize];
        nvrtc_check(
            unsafe { nv::nvrtcGetSupportedArchs(archs.as_mut_ptr()) },
            "nvrtcGetSupportedArchs",
        )?;
        Ok(archs.into_iter().map(|a| a as u32).collect())
    })
}

/// What [`compile`] returns: PTX text (for `compute_XX`) or a cubin (SASS for `sm_XX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Ptx,
    Cubin,
}

/// Destroys an NVRTC program when dropped, whatever path the compile takes.
struct Program(nv::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once.
        unsafe {
            nv::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

/// Compile one of [`SOURCES`] for `arch` (e.g. 90 for sm_90).
///
/// Options: IEEE division and square root, no fused multiply-add contraction, so each element
/// gets the same roundings as the Rust kernels and `reference.py`.
pub fn compile(source: &str, arch: u32, out: Output) -> Result<Vec<u8>> {
    let code = SOURCES
        .iter()
        .find(|(n, _)| *n == source)
        .map(|(_, c)| *c)
        .ok_or_else(|| {
            crate::Error::value(
                "source",
                format!("expected one of {:?}, got {source:?}", names()),
            )
        })?;
    crate::error::ensure((30..=200).contains(&arch), "arch", || {
        format!("expected a compute capability such as 80 or 90, got {arch}")
    })?;
    guarded("libnvrtc", || {
        ensure_nvrtc()?;
        let src =
            CString::new(code).map_err(|_| crate::Error::value("source", "contains a NUL byte"))?;
        let name = CString::new(format!("{source}.cu")).expect("no NUL in a family name");
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C strings; no headers.
        nvrtc_check(
            unsafe {
                nv::nvrtcCreateProgram(
                    &mut raw,
                    src.as_ptr(),
                    name.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            },
            "nvrtcCreateProgram",
        )?;
        let prog = Program(raw);
        let target = match out {
            Output::Ptx => format!("--gpu-architecture=compute_{arch}"),
            Output::Cubin => format!("--gpu-architecture=sm_{arch}"),
        };
        let opts: Vec<CString> = [
            target.as_str(),
            "--std=c++17",
            "--fmad=false",
            "--prec-div=true",
            "--prec-sqrt=true",
        ]
        .iter()
        .map(|s| CString::new(*s).expect("no NUL in an option"))
        .collect();
        let ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: the option array outlives the call.
        let r = unsafe { nv::nvrtcCompileProgram(prog.0, ptrs.len() as i32, ptrs.as_ptr()) };
        if r != nv::nvrtcResult::NVRTC_SUCCESS {
            return Err(CudaError::Compile {
                source: source.into(),
                arch,
                log: program_log(&prog),
            });
        }
        let mut size = 0usize;
        let mut buf;
        // SAFETY: size query, then a buffer of exactly that size.
        unsafe {
            match out {
                Output::Ptx => {
                    nvrtc_check(nv::nvrtcGetPTXSize(prog.0, &mut size), "nvrtcGetPTXSize")?;
                    buf = vec![0u8; size];
                    nvrtc_check(
                        nv::nvrtcGetPTX(prog.0, buf.as_mut_ptr().cast()),
                        "nvrtcGetPTX",
                    )?;
                }
                Output::Cubin => {
                    nvrtc_check(
                        nv::nvrtcGetCUBINSize(prog.0, &mut size),
                        "nvrtcGetCUBINSize",
                    )?;
                    buf = vec![0u8; size];
                    nvrtc_check(
                        nv::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()),
                        "nvrtcGetCUBIN",
                    )?;
                }
            }
        }
        Ok(buf)
    })
}

fn program_log(prog: &Program) -> String {
    let mut size = 0usize;
    // SAFETY: size query, then a buffer of that size.
    unsafe {
        if nv::nvrtcGetProgramLogSize(prog.0, &mut size) != nv::nvrtcResult::NVRTC_SUCCESS {
            return "(no log)".into();
        }
        let mut buf = vec![0u8; size];
        if nv::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr().cast()) != nv::nvrtcResult::NVRTC_SUCCESS
        {
            return "(no log)".into();
        }
        String::from_utf8_lossy(&buf)
            .trim_end_matches('\0')
            .to_string()
    }
}

/// Names of the embedded sources.
pub fn names() -> Vec<&'static str> {
    SOURCES.iter().map(|(n, _)| *n).collect()
}

/// Compile every source to PTX (and, with `cubin`, also to a cubin) for `arch`; returns each
/// source's name and PTX size. This is the compile test CI runs without a GPU.
pub fn compile_check(arch: u32, cubin: bool) -> Result<Vec<(String, usize)>> {
    let mut out = Vec::new();
    for name in names() {
        let ptx = compile(name, arch, Output::Ptx)?;
        if cubin {
            compile(name, arch, Output::Cubin)?;
        }
        out.push((name.to_string(), ptx.len()));
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Driver: primary context, modules, launches
// ------------------------------------------------------------------------------------------

fn cu_check(r: cu::CUresult, call: &'static str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string (or fails).
    let name = unsafe {
        if cu::cuGetErrorName(r, &mut s) == cu::CUresult::CUDA_SUCCESS && !s.is_null() {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        } else {
            format!("{r:?}")
        }
    };
    Err(CudaError::Call { call, code: name })
}

fn ensure_driver() -> Result<()> {
    static INIT: OnceLock<()> = OnceLock::new();
    if INIT.get().is_some() {
        return Ok(());
    }
    // SAFETY: only tries to dlopen the candidate names.
    if !unsafe { cu::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "CUDA driver: libcuda.so.1 not found (no NVIDIA driver on this machine?)".into(),
        ));
    }
    // SAFETY: cuInit is idempotent and thread-safe.
    cu_check(unsafe { cu::cuInit(0) }, "cuInit")?;
    let _ = INIT.set(());
    Ok(())
}

/// One device's state: its retained primary context and the modules loaded in it.
struct Device {
    ctx: cu::CUcontext,
    arch: u32,
    functions: HashMap<&'static str, cu::CUfunction>,
    modules: HashMap<&'static str, cu::CUmodule>,
}

// SAFETY: the handles are plain driver handles, valid from any thread; access is serialised by
// the DEVICES mutex.
unsafe impl Send for Device {}

static DEVICES: Mutex<Option<HashMap<i32, Device>>> = Mutex::new(None);
/// Compiled cubins by (source name, arch).
type CubinCache = HashMap<(&'static str, u32), Vec<u8>>;
static CUBINS: Mutex<Option<CubinCache>> = Mutex::new(None);

/// Pushes a context on creation and pops it when dropped.
struct Current;

impl Current {
    fn push(ctx: cu::CUcontext) -> Result<Current> {
        // SAFETY: ctx is a retained primary context.
        cu_check(unsafe { cu::cuCtxPushCurrent_v2(ctx) }, "cuCtxPushCurrent")?;
        Ok(Current)
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        let mut old = std::ptr::null_mut();
        // SAFETY: pops exactly the context pushed above.
        unsafe {
            cu::cuCtxPopCurrent_v2(&mut old);
        }
    }
}

fn source_of(kernel: &str) -> Option<&'static str> {
    match kernel {
        "accumulate" | "ssd_dampen" | "find_invalid" => Some("importance"),
        "kv_accumulate" | "kv_rowsum" | "kv_select_keep" | "kv_evict_one" | "kv_row_stats"
        | "kv_colsum" => Some("kvscore"),
        _ => None,
    }
}

fn open_device(ordinal: i32) -> Result<Device> {
    ensure_driver()?;
    let mut count = 0;
    // SAFETY: out-pointers to live integers.
    cu_check(
        unsafe { cu::cuDeviceGetCount(&mut count) },
        "cuDeviceGetCount",
    )?;
    if ordinal < 0 || ordinal >= count {
        return Err(crate::Error::value(
            "device",
            format!("expected a CUDA device index below {count}, got {ordinal}"),
        )
        .into());
    }
    let mut dev = 0;
    cu_check(unsafe { cu::cuDeviceGet(&mut dev, ordinal) }, "cuDeviceGet")?;
    let (mut major, mut minor) = (0, 0);
    use cu::CUdevice_attribute::*;
    cu_check(
        unsafe {
            cu::cuDeviceGetAttribute(
                &mut major,
                CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                dev,
            )
        },
        "cuDeviceGetAttribute",
    )?;
    cu_check(
        unsafe {
            cu::cuDeviceGetAttribute(
                &mut minor,
                CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                dev,
            )
        },
        "cuDeviceGetAttribute",
    )?;
    let mut ctx = std::ptr::null_mut();
    // The primary context torch's runtime uses; retained for the life of the process.
    cu_check(
        unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
        "cuDevicePrimaryCtxRetain",
    )?;
    Ok(Device {
        ctx,
        arch: (major * 10 + minor) as u32,
        functions: HashMap::new(),
        modules: HashMap::new(),
    })
}

/// The cubin of `source` for `arch`, compiled once per process and architecture.
fn cubin(source: &'static str, arch: u32) -> Result<Vec<u8>> {
    {
        let cache = CUBINS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = cache.as_ref().and_then(|c| c.get(&(source, arch))) {
            return Ok(b.clone());
        }
    }
    let supported = supported_archs()?;
    if !supported.contains(&arch) {
        let (a, b) = nvrtc_version()?;
        return Err(CudaError::Unavailable(format!(
            "libnvrtc {a}.{b} cannot compile for this GPU (sm_{arch}); it supports {supported:?}: \
             install a CUDA wheel of torch whose NVRTC knows this architecture"
        )));
    }
    let bin = compile(source, arch, Output::Cubin)?;
    let mut cache = CUBINS.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .get_or_insert_with(HashMap::new)
        .insert((source, arch), bin.clone());
    Ok(bin)
}

/// Launch `kernel` on `stream` of device `ordinal`, compiling and loading its module first if
/// needed. `params` are pointers to the kernel's arguments, in order; `smem` bytes of dynamic
/// shared memory (above the default 48 KiB the kernel is opted in first).
///
/// # Safety
/// Every device pointer among the arguments must be valid for what the kernel reads and writes,
/// on that device, until the stream reaches the kernel; `stream` must belong to the device.
pub unsafe fn launch(
    ordinal: i32,
    stream: u64,
    kernel: &'static str,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    params: &mut [*mut c_void],
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let source = source_of(kernel)
        .ok_or_else(|| crate::Error::value("kernel", format!("unknown kernel {kernel:?}")))?;
    guarded("CUDA driver", || {
        let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        let devices = devices.get_or_insert_with(HashMap::new);
        if let std::collections::hash_map::Entry::Vacant(e) = devices.entry(ordinal) {
            e.insert(open_device(ordinal)?);
        }
        let dev = devices.get_mut(&ordinal).expect("inserted above");
        let _current = Current::push(dev.ctx)?;
        if !dev.modules.contains_key(source) {
            let bin = cubin(source, dev.arch)?;
            let mut module = std::ptr::null_mut();
            // SAFETY: a cubin NVRTC produced for this device's architecture.
            cu_check(
                unsafe { cu::cuModuleLoadData(&mut module, bin.as_ptr().cast()) },
                "cuModuleLoadData",
            )?;
            dev.modules.insert(source, module);
        }
        let func = match dev.functions.get(kernel) {
            Some(f) => *f,
            None => {
                let name = CString::new(kernel).expect("no NUL in a kernel name");
                let mut f = std::ptr::null_mut();
                // SAFETY: module loaded above; the name is a C string.
                cu_check(
                    unsafe { cu::cuModuleGetFunction(&mut f, dev.modules[source], name.as_ptr()) },
                    "cuModuleGetFunction",
                )?;
                dev.functions.insert(kernel, f);
                f
            }
        };
        if smem > 48 * 1024 {
            use cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SMEM;
            // SAFETY: a function handle of this context.
            cu_check(
                unsafe { cu::cuFuncSetAttribute(func, MAX_SMEM, smem as i32) },
                "cuFuncSetAttribute",
            )?;
        }
        // SAFETY: the caller guarantees the arguments; the stream comes from torch.
        cu_check(
            unsafe {
                cu::cuLaunchKernel(
                    func,
                    grid.0,
                    grid.1,
                    grid.2,
                    block,
                    1,
                    1,
                    smem,
                    stream as usize as cu::CUstream,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
    })
}

/// (compute capability as 90, driver version as 13000) of device `ordinal`: the driver check.
pub fn device_info(ordinal: i32) -> Result<(u32, i32)> {
    guarded("CUDA driver", || {
        let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        let devices = devices.get_or_insert_with(HashMap::new);
        if let std::collections::hash_map::Entry::Vacant(e) = devices.entry(ordinal) {
            e.insert(open_device(ordinal)?);
        }
        let mut version = 0;
        // SAFETY: out-pointer to a live integer.
        cu_check(
            unsafe { cu::cuDriverGetVersion(&mut version) },
            "cuDriverGetVersion",
        )?;
        Ok((devices[&ordinal].arch, version))
    })
}

/// Pointer to a kernel argument, as cuLaunchKernel takes them.
pub(crate) fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_names_an_embedded_source() {
        for k in [
            "accumulate",
            "ssd_dampen",
            "find_invalid",
            "kv_accumulate",
            "kv_rowsum",
            "kv_select_keep",
            "kv_evict_one",
            "kv_row_stats",
            "kv_colsum",
        ] {
            let s = source_of(k).unwrap();
            let (_, code) = SOURCES.iter().find(|(n, _)| *n == s).unwrap();
            assert!(
                code.contains(&format!("{k}(")),
                "{k} not defined in cuda/{s}.cu"
            );
        }
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        assert!(matches!(
            compile("nope", 90, Output::Ptx),
            Err(CudaError::Arg(_))
        ));
        assert!(matches!(
            compile("importance", 7, Output::Ptx),
            Err(CudaError::Arg(_))
        ));
    }

    /// Compiles every source when libnvrtc is on the loader path (the Python test suite covers
    /// the usual case, where it comes from torch's wheels); otherwise the error must be clean.
    #[test]
    fn compile_or_clean_error() {
        match compile_check(80, false) {
            Ok(v) => assert_eq!(v.len(), SOURCES.len()),
            Err(CudaError::Unavailable(m)) => assert!(m.starts_with("libnvrtc")),
            Err(e) => panic!("{e}"),
        }
    }
}
