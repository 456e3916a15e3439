//! f64 reference: TODO (being written).
