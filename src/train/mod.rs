//! Multi-task training (being written).
