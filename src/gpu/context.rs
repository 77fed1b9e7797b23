//! Opening a headless wgpu device: instance → adapter → device, with the adapter's own limits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// A headless wgpu device and queue plus what we know about the adapter.
///
/// Cheap to clone (wgpu handles are reference counted). xattn's own device work runs inside
/// wgpu error scopes ([`Context::scoped`]), so its validation and out-of-memory errors come
/// back as [`Error`] from the call that caused them. On a device xattn opened itself, errors
/// outside any scope and device loss are also recorded and reported by the next
/// [`Context::check`]; on a caller's device ([`Context::from_wgpu`]) the caller's handlers
/// stay in place.
#[derive(Clone, Debug)]
pub struct Context {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// Adapter name, backend, driver.
    pub info: wgpu::AdapterInfo,
    /// Limits of the opened device (the adapter's own, not wgpu's defaults).
    pub limits: wgpu::Limits,
    /// Features enabled on the device.
    pub features: wgpu::Features,
    /// The adapter's matrix-unit configurations (`cooperative_matrix_properties`) where
    /// xattn enabled them (`XATTN_MATRIX_UNITS=1`); empty otherwise and on a caller's device.
    pub matrix_configs: Vec<wgpu::CooperativeMatrixProperties>,
    fault: Arc<Mutex<Option<Error>>>,
    /// On wgpu's GL backend, held across each xattn call's device work (see
    /// [`Context::scoped`]); `None` elsewhere.
    gl_serial: Option<Arc<Mutex<()>>>,
    /// Buffers and bind groups xattn has created on this device (see
    /// [`Context::objects_created`]).
    created: Arc<AtomicU64>,
    /// On the web, the error scopes [`Context::scoped`] popped whose verdicts are still
    /// promises; [`Context::settle`] awaits them.
    #[cfg(target_arch = "wasm32")]
    unsettled: Unsettled,
}

/// Error-scope verdicts not yet awaited (the web's scopes pop asynchronously).
#[cfg(target_arch = "wasm32")]
#[derive(Clone, Default)]
struct Unsettled(Arc<Mutex<Vec<ScopeVerdict>>>);

#[cfg(target_arch = "wasm32")]
type ScopeVerdict = std::pin::Pin<Box<dyn std::future::Future<Output = Option<wgpu::Error>>>>;

#[cfg(target_arch = "wasm32")]
impl std::fmt::Debug for Unsettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().unwrap_or_else(|p| p.into_inner()).len();
        write!(f, "Unsettled({n} scopes)")
    }
}

/// xattn's lock on a GL device, `None` elsewhere. wgpu's GL backend takes its one context
/// lock (6 s timeout, then a panic) to create and to destroy objects and holds it across
/// blocking waits, so xattn serializes all of these on its own lock, which waits without a
/// timeout.
pub(crate) type SerialLock = Option<Arc<Mutex<()>>>;

thread_local! {
    /// The serial lock this thread holds (its address; 0 for none): taking it again must not
    /// deadlock.
    static HELD_SERIAL: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A held serial lock (see [`SerialLock`]).
pub(crate) struct SerialGuard<'a> {
    _guard: std::sync::MutexGuard<'a, ()>,
    outer: usize,
}

impl Drop for SerialGuard<'_> {
    fn drop(&mut self) {
        HELD_SERIAL.with(|h| h.set(self.outer));
    }
}

/// Takes `lock` unless there is none or this thread already holds it.
pub(crate) fn lock_serial(lock: &SerialLock) -> Option<SerialGuard<'_>> {
    let lock = lock.as_ref()?;
    let id = Arc::as_ptr(lock) as usize;
    let outer = HELD_SERIAL.with(|h| h.get());
    if outer == id {
        return None;
    }
    let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    HELD_SERIAL.with(|h| h.set(id));
    Some(SerialGuard {
        _guard: guard,
        outer,
    })
}

/// Features xattn uses where the adapter has them.
const WANTED_FEATURES: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY
    .union(wgpu::Features::SHADER_F16)
    .union(wgpu::Features::SUBGROUP);

/// What xattn does without each wanted feature, and what that costs.
const WITHOUT: [(wgpu::Features, &str, &str); 3] = [
    (
        wgpu::Features::SUBGROUP,
        "SUBGROUP",
        "the fused kernel runs without subgroup lanes or broadcast loads (on lavapipe one \
         decode step, M 1 over N 1500 keys, 8 heads of 64, took 20.5 ms instead of 3.2 ms)",
    ),
    (
        wgpu::Features::SHADER_F16,
        "SHADER_F16",
        "f16 tensors are read as packed pairs in u32 words and unpacked by the kernels \
         instead of loaded as f16",
    ),
    (
        wgpu::Features::TIMESTAMP_QUERY,
        "TIMESTAMP_QUERY",
        "the bench and the autotuner time with the host clock around a wait for the device, \
         not with GPU timestamps",
    ),
];

/// The features to request when opening a device on `adapter` for xattn: those it uses that
/// the adapter has (subgroups, f16 in shaders, timestamps). Without them xattn still computes
/// the same results, more slowly ([`Context::degradations`] says what each costs).
///
/// ```no_run
/// # async fn open(adapter: wgpu::Adapter) -> xattn::Result<()> {
/// let (device, queue) = adapter
///     .request_device(&wgpu::DeviceDescriptor {
///         required_features: xattn::device::wanted_features(&adapter),
///         required_limits: xattn::device::wanted_limits(&adapter),
///         ..Default::default()
///     })
///     .await
///     .expect("a device");
/// let ctx = xattn::Context::from_wgpu(device, queue)?;
/// assert!(ctx.degradations().is_empty());
/// # Ok(()) }
/// ```
pub fn wanted_features(adapter: &wgpu::Adapter) -> wgpu::Features {
    adapter.features() & WANTED_FEATURES
}

/// The limits to request when opening a device on `adapter` for xattn: the adapter's own.
/// wgpu's defaults (128 MiB per storage binding, 16 KiB of workgroup memory) make the planner
/// split work more, or refuse problems the adapter could run.
pub fn wanted_limits(adapter: &wgpu::Adapter) -> wgpu::Limits {
    adapter.limits()
}

/// Creates the instance from the environment (`WGPU_BACKEND`, `WGPU_DEBUG`, …).
pub fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Every adapter the instance can see on the backends `WGPU_BACKEND` allows.
#[cfg(not(target_arch = "wasm32"))]
pub fn adapters() -> Vec<wgpu::Adapter> {
    let instance = instance();
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

fn backend_filter() -> String {
    match std::env::var("WGPU_BACKEND") {
        Ok(b) => format!(" for WGPU_BACKEND={b}"),
        Err(_) => String::new(),
    }
}

impl Context {
    /// Opens the default adapter: `WGPU_ADAPTER_NAME` (substring, case-insensitive) picks
    /// one by name, `WGPU_BACKEND` restricts the backends, `WGPU_POWER_PREF` the preference.
    /// Blocks until the device is open; on the web, where nothing may block, there is only
    /// [`Context::new_async`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// [`Context::new`] as a future: the way to open a device in a browser (WebGPU's adapter
    /// and device requests are promises), where the environment variables are never set.
    pub async fn new_async() -> Result<Self> {
        let instance = instance();
        let adapter = match std::env::var("WGPU_ADAPTER_NAME") {
            Ok(want) => {
                let want_lc = want.to_lowercase();
                instance
                    .enumerate_adapters(wgpu::Backends::all())
                    .await
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&want_lc))
                    .ok_or_else(|| Error::NoAdapter {
                        detail: format!(" named like WGPU_ADAPTER_NAME={want}{}", backend_filter()),
                    })?
            }
            Err(_) => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::from_env()
                        .unwrap_or(wgpu::PowerPreference::HighPerformance),
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::NoAdapter {
                    detail: format!("{} ({e})", backend_filter()),
                })?,
        };
        Self::from_adapter_async(&adapter).await
    }

    /// Opens a device on the given adapter with all of its limits and the features xattn uses;
    /// with `XATTN_MATRIX_UNITS=1` also its matrix units, where it reports them.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        pollster::block_on(Self::from_adapter_async(adapter))
    }

    /// [`Context::from_adapter`] as a future (the web's only way).
    pub async fn from_adapter_async(adapter: &wgpu::Adapter) -> Result<Self> {
        let info = adapter.get_info();
        let mut features = adapter.features() & WANTED_FEATURES;
        let matrix = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        let matrix_configs =
            if crate::settings::matrix_units() && adapter.features().contains(matrix) {
                features |= matrix;
                adapter.cooperative_matrix_properties()
            } else {
                Vec::new()
            };
        let experimental_features = if features.contains(matrix) {
            // SAFETY: wgpu asks callers of experimental features to accept that its
            // implementation may still have bugs. xattn enables this one only where the user
            // asked for it (XATTN_MATRIX_UNITS=1), and uses it only in flash_coop, which runs
            // only where forced (FusedConfig::MATRIX_UNITS).
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("xattn.device"),
                required_features: features,
                required_limits: adapter.limits(),
                experimental_features,
                memory_hints: wgpu::MemoryHints::Performance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::RequestDevice {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;
        let mut ctx = Self::wrap(device, queue);
        ctx.matrix_configs = matrix_configs;
        ctx.watch_device();
        for lack in ctx.degradations() {
            log::info!("{}: the adapter {lack}", ctx.describe());
        }
        Ok(ctx)
    }

    /// Wraps a device and queue the caller already owns: adapter info, limits and features
    /// are read from the device, and the caller's uncaptured-error and device-lost handlers
    /// are left alone (xattn's errors reach xattn's calls through error scopes). Open the
    /// device with [`wanted_features`] and [`wanted_limits`]: what it lacks of them is logged
    /// as a warning (the `log` facade) with what it costs, and listed by
    /// [`Context::degradations`].
    pub fn from_wgpu(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        let ctx = Self::wrap(device, queue);
        for lack in ctx.degradations() {
            log::warn!(
                "{}: the device {lack}; open it with xattn::device::wanted_features(&adapter) \
                 where the adapter has the feature",
                ctx.describe()
            );
        }
        Ok(ctx)
    }

    fn wrap(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let info = device.adapter_info();
        Self {
            gl_serial: (info.backend == wgpu::Backend::Gl).then(Arc::default),
            info,
            limits: device.limits(),
            features: device.features(),
            matrix_configs: Vec::new(),
            device,
            queue,
            fault: Arc::default(),
            created: Arc::default(),
            #[cfg(target_arch = "wasm32")]
            unsettled: Unsettled::default(),
        }
    }

    /// What this device lacks of the features xattn uses, one line each with what it costs
    /// (`has no SUBGROUP: …`); empty when it has them all. Results are the same either way.
    pub fn degradations(&self) -> Vec<String> {
        WITHOUT
            .iter()
            .filter(|(feature, _, _)| !self.features.contains(*feature))
            .map(|(_, name, cost)| format!("has no {name}: {cost}"))
            .collect()
    }

    /// On a device xattn owns: records errors outside any scope and device loss for
    /// [`Context::check`].
    fn watch_device(&self) {
        let on_error = self.fault.clone();
        self.device
            .on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut slot = on_error.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(Error::Gpu(e.to_string()));
            }));
        let on_lost = self.fault.clone();
        self.device
            .set_device_lost_callback(move |reason, message| {
                let mut slot = on_lost.lock().unwrap_or_else(|p| p.into_inner());
                *slot = Some(Error::DeviceLost(format!("{reason:?}: {message}")));
            });
    }

    /// Runs `work` (device calls of this thread) inside wgpu error scopes and returns the
    /// first error they caught, else `work`'s result. wgpu's scopes are per thread, so
    /// another thread's errors, the caller's own included, never land here.
    ///
    /// On the web a scope's verdict is a promise, and nothing may block on it: the scopes are
    /// popped here and their verdicts reported by the call's [`Context::settle`] (the end of
    /// every `_async` call), so an error still reaches the call that caused it, one await
    /// later.
    ///
    /// On wgpu's GL backend the work of xattn's calls is also serialized: that backend holds
    /// one context lock across a blocking wait, and a thread that waits more than 6 s for it
    /// panics inside wgpu (wgpu-hal's `CONTEXT_LOCK_TIMEOUT_SECS`); threads queue here
    /// instead, with no timeout.
    pub fn scoped<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let _serial = self.serial();
        let scopes = [
            wgpu::ErrorFilter::Validation,
            wgpu::ErrorFilter::OutOfMemory,
            wgpu::ErrorFilter::Internal,
        ]
        .map(|filter| self.device.push_error_scope(filter));
        let result = work();
        // Scopes pop innermost first.
        let popped = scopes.into_iter().rev().map(|scope| scope.pop());
        #[cfg(target_arch = "wasm32")]
        {
            let mut unsettled = self.unsettled.0.lock().unwrap_or_else(|p| p.into_inner());
            unsettled.extend(popped.map(|verdict| Box::pin(verdict) as ScopeVerdict));
            result
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            // Every scope pops before the first error is reported.
            let caught: Vec<wgpu::Error> = popped.filter_map(pollster::block_on).collect();
            match caught.into_iter().next() {
                Some(e) => Err(Error::Gpu(e.to_string())),
                None => result,
            }
        }
    }

    /// Reports the first device error of xattn's calls not yet reported: on the web, the
    /// verdicts of the error scopes [`Context::scoped`] popped (awaited here); everywhere,
    /// what the device recorded outside any scope since the last check.
    pub(crate) async fn settle(&self) -> Result<()> {
        #[cfg(target_arch = "wasm32")]
        {
            let verdicts =
                std::mem::take(&mut *self.unsettled.0.lock().unwrap_or_else(|p| p.into_inner()));
            let mut caught = None;
            for verdict in verdicts {
                if let Some(e) = verdict.await {
                    caught.get_or_insert(Error::Gpu(e.to_string()));
                }
            }
            if let Some(e) = caught {
                return Err(e);
            }
        }
        self.take_fault()
    }

    /// On the GL backend, xattn's lock on the device (see [`Context::scoped`]).
    pub(crate) fn serial(&self) -> Option<SerialGuard<'_>> {
        lock_serial(&self.gl_serial)
    }

    /// The lock [`Context::serial`] takes, for what outlives a call and must drop device
    /// objects under it (pools, pipeline caches).
    pub(crate) fn serial_lock(&self) -> SerialLock {
        self.gl_serial.clone()
    }

    /// Blocks until the queue is idle, then reports any error the device recorded since the
    /// last check. A device-loss error stays: the device cannot be used again.
    pub fn check(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost(e.to_string()))?;
        self.take_fault()
    }

    /// Whether a read of the device's memory may block until it arrives: not on the web,
    /// where the browser runs a mapping's callback only after the calling task returns. There
    /// `what` is refused with the async call to use instead.
    pub(crate) fn blocking_read_allowed(&self, what: &str, instead: &str) -> Result<()> {
        if cfg!(target_arch = "wasm32") {
            return Err(Error::Unsupported(format!(
                "{what} waits for the device, which a browser does not allow: use {instead}"
            )));
        }
        Ok(())
    }

    /// The error the device recorded since the last check, if any (without waiting).
    pub(crate) fn take_fault(&self) -> Result<()> {
        let mut slot = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            None => Ok(()),
            Some(Error::DeviceLost(msg)) => {
                *slot = Some(Error::DeviceLost(msg.clone()));
                Err(Error::DeviceLost(msg))
            }
            Some(e) => Err(e),
        }
    }

    /// One line naming the adapter: `name (backend, device type, driver)`.
    pub fn describe(&self) -> String {
        describe_info(&self.info)
    }

    /// Buffers and bind groups xattn has created on this device so far, by every call on any
    /// engine or tensor of this context (staging buffers of reads included). A prepared call
    /// that runs again adds none.
    pub fn objects_created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// `device.create_buffer`, counted.
    pub(crate) fn create_buffer(&self, desc: &wgpu::BufferDescriptor) -> wgpu::Buffer {
        self.created.fetch_add(1, Ordering::Relaxed);
        self.device.create_buffer(desc)
    }

    /// `device.create_buffer_init`, counted.
    pub(crate) fn create_buffer_init(
        &self,
        desc: &wgpu::util::BufferInitDescriptor,
    ) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        self.created.fetch_add(1, Ordering::Relaxed);
        self.device.create_buffer_init(desc)
    }

    /// `device.create_bind_group`, counted.
    pub(crate) fn create_bind_group(&self, desc: &wgpu::BindGroupDescriptor) -> wgpu::BindGroup {
        self.created.fetch_add(1, Ordering::Relaxed);
        self.device.create_bind_group(desc)
    }

    /// The limits and quirks the planner respects on this device.
    pub fn caps(&self) -> crate::plan::DeviceCaps {
        crate::plan::DeviceCaps {
            loop_cap: crate::plan::loop_cap_of(&self.info),
            native_f16: self.features.contains(wgpu::Features::SHADER_F16),
            subgroup_lanes: crate::plan::subgroup_lanes_of(
                self.features.contains(wgpu::Features::SUBGROUP),
                self.info.subgroup_min_size,
                self.info.subgroup_max_size,
            ),
            scalar_lane_loads: self.info.device_type == wgpu::DeviceType::Cpu,
            matrix_units: crate::plan::matrix_units_of(&self.matrix_configs),
            // On a CPU adapter the host's threads run the workgroups.
            fill: crate::plan::fill_of(
                self.info.device_type,
                std::thread::available_parallelism().map_or(1, usize::from),
            ),
            ..crate::plan::DeviceCaps::from_limits(&self.limits)
        }
    }

    /// Whether GPU timestamps can bracket compute passes.
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }
}

/// `name (backend, device type, driver driver_info)`.
pub fn describe_info(info: &wgpu::AdapterInfo) -> String {
    format!(
        "{} ({:?}, {:?}, {} {})",
        info.name, info.backend, info.device_type, info.driver, info.driver_info
    )
}
