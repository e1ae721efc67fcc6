//! The conformance suite. Each store's tests call [`run_all`] (or single cases) with a
//! factory that makes a fresh, empty store; nothing here knows which store it is testing.
