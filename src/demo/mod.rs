//! Demo: reference host, runtime, dev certificates.
