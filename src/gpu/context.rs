//! Opening a headless wgpu device: instance → adapter → device, with the adapter's own limits.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// A headless wgpu device and queue plus what we know about the adapter.
///
/// Cheap to clone (wgpu handles are reference counted). Errors the device reports outside
/// any scope (validation, out of memory) and device loss are recorded and turned into
/// [`Error`] by the next operation that checks ([`Context::check`]).
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
    fault: Arc<Mutex<Option<Error>>>,
}

/// Features xattn uses where the adapter has them.
const WANTED_FEATURES: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY;

/// Creates the instance from the environment (`WGPU_BACKEND`, `WGPU_DEBUG`, …).
pub fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Every adapter the instance can see on the backends `WGPU_BACKEND` allows.
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
    pub fn new() -> Result<Self> {
        let instance = instance();
        let adapter = match std::env::var("WGPU_ADAPTER_NAME") {
            Ok(want) => {
                let want_lc = want.to_lowercase();
                pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&want_lc))
                    .ok_or_else(|| Error::NoAdapter {
                        detail: format!(" named like WGPU_ADAPTER_NAME={want}{}", backend_filter()),
                    })?
            }
            Err(_) => pollster::block_on(
                instance.request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::from_env()
                        .unwrap_or(wgpu::PowerPreference::HighPerformance),
                    ..Default::default()
                }),
            )
            .map_err(|e| Error::NoAdapter {
                detail: format!("{} ({e})", backend_filter()),
            })?,
        };
        Self::from_adapter(&adapter)
    }

    /// Opens a device on the given adapter with all of its limits and the features xattn uses.
    pub fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        let info = adapter.get_info();
        let features = adapter.features() & WANTED_FEATURES;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("xattn.device"),
            required_features: features,
            required_limits: adapter.limits(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        }))
        .map_err(|e| Error::RequestDevice {
            adapter: info.name.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self::from_device(device, queue, info))
    }

    /// Wraps a device the caller already owns (its limits and features are read from it).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        let fault: Arc<Mutex<Option<Error>>> = Arc::default();
        let on_error = fault.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = on_error.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(Error::Gpu(e.to_string()));
        }));
        let on_lost = fault.clone();
        device.set_device_lost_callback(move |reason, message| {
            let mut slot = on_lost.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some(Error::DeviceLost(format!("{reason:?}: {message}")));
        });
        Self {
            limits: device.limits(),
            features: device.features(),
            device,
            queue,
            info,
            fault,
        }
    }

    /// Blocks until the queue is idle, then reports any error the device recorded since the
    /// last check. A device-loss error stays: the device cannot be used again.
    pub fn check(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost(e.to_string()))?;
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
