//! Error text for people: an error and its sources, in order, by their `Display` only.

/// `e` followed by each of its sources (skipping a source whose text the previous ones already
/// contain). The AWS SDK's and kube's top-level messages ("dispatch failure", "client error")
/// say little on their own; their `Debug` form, which the SDK's `DisplayErrorContext` appends,
/// is a struct dump no user should have to read.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A source error kept behind an `Arc`, for error types that must stay `Clone` (relay state,
/// conditions) while still giving [`chain`] and `tracing` the error they wrap. Its text and
/// its own sources are the wrapped error's; two are equal when their texts are.
#[derive(Clone)]
pub struct Source(std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>);

impl Source {
    /// Keeps `e` as the source.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(e))
    }

    /// A source that is only a message (an error that arrived as text, or a condition found
    /// here with no error underneath).
    pub fn message(text: impl Into<String>) -> Self {
        Self::new(Message(text.into()))
    }
}

/// An error that is only its text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Message(String);

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Source {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Source {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for Source {}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner: refused")]
    struct Inner;

    #[test]
    fn sources_follow_in_order() {
        assert_eq!(super::chain(&Outer(Inner)), "outer: inner: refused");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] super::Source);

    #[test]
    fn a_shared_source_is_transparent_to_the_chain() {
        let wrapped = Wrapper(super::Source::new(Outer(Inner)));
        assert_eq!(super::chain(&wrapped), "wrapper: outer: inner: refused");
        assert_eq!(
            super::Source::message("x"),
            super::Source::new(super::Source::message("x"))
        );
    }
}
