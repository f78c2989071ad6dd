//! Testing kit (in progress).
