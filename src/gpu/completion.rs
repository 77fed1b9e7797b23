//! Futures that resolve when the device has finished something, without blocking the thread
//! that awaits them (`Prepared::run_async`, `Tensor::to_host_async`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};

use crate::gpu::context::Context;

/// Set once by a wgpu callback; wakes the task that waits for it.
#[derive(Debug, Default)]
struct Signal {
    state: Mutex<(bool, Option<Waker>)>,
}

impl Signal {
    fn fire(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 = true;
        if let Some(waker) = state.1.take() {
            waker.wake();
        }
    }
}

/// Resolves when the callback it armed has run.
#[derive(Debug)]
pub struct Completion {
    signal: Arc<Signal>,
}

impl Future for Completion {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let mut state = self.signal.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 {
            return Poll::Ready(());
        }
        state.1 = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Context {
    /// A future for work just submitted: `arm` hands a callback to wgpu (`map_async`,
    /// `on_submitted_work_done`) that resolves it. wgpu makes progress on native only while
    /// someone polls the device, so there a waiter thread does (under xattn's GL lock on the
    /// GL backend); on the web the browser runs the callbacks.
    pub(crate) fn completion(&self, arm: impl FnOnce(Box<dyn FnOnce() + Send>)) -> Completion {
        let signal = Arc::new(Signal::default());
        let fire = signal.clone();
        arm(Box::new(move || fire.fire()));
        #[cfg(not(target_arch = "wasm32"))]
        {
            let ctx = self.clone();
            std::thread::spawn(move || {
                let _serial = ctx.serial();
                // A lost device shows in the fault the awaiting call reads next.
                let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
            });
        }
        Completion { signal }
    }
}
