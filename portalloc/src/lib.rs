//! portalloc
