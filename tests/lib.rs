//! End-to-end scenarios across viking's parts live in `scenarios/`; this library is empty.
