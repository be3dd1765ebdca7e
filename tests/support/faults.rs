//! AWS faults that moto cannot produce (throttling, 5xx): an SDK interceptor that replaces real
//! responses with AWS error responses before the SDK reads them. A mock layer, since no peer here
//! can throttle.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextMut;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::ConfigBag;

/// Which responses to replace.
#[derive(Debug, Clone, Copy)]
pub enum Which {
    /// The first n.
    First(usize),
    /// About this percentage, at random.
    Percent(u32),
}

#[derive(Debug)]
pub struct Faults {
    which: Which,
    status: u16,
    code: &'static str,
    seen: AtomicUsize,
    /// How many responses were replaced.
    pub injected: Arc<AtomicUsize>,
}

impl Faults {
    pub fn new(which: Which, status: u16, code: &'static str) -> Self {
        Self {
            which,
            status,
            code,
            seen: AtomicUsize::new(0),
            injected: Arc::default(),
        }
    }

    /// `ThrottlingException` (400) for the chosen responses.
    pub fn throttling(which: Which) -> Self {
        Self::new(which, 400, "ThrottlingException")
    }
}

impl Intercept for Faults {
    fn name(&self) -> &'static str {
        "test-faults"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let n = self.seen.fetch_add(1, Ordering::SeqCst);
        let fail = match self.which {
            Which::First(first) => n < first,
            Which::Percent(p) => fastrand::u32(0..100) < p,
        };
        if fail {
            self.injected.fetch_add(1, Ordering::Relaxed);
            let resp = context.response_mut();
            *resp.status_mut() = self.status.try_into()?;
            resp.headers_mut().insert("x-amzn-ErrorType", self.code);
            resp.headers_mut()
                .insert("content-type", "application/json");
            *resp.body_mut() = SdkBody::from(format!(r#"{{"message":"injected {}"}}"#, self.code));
        }
        Ok(())
    }
}
