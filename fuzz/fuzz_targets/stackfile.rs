//! The stack-file parser on arbitrary input: it must return an error, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use schema::{JobName, StackName};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let stack = StackName::new("fuzz").expect("valid");
    let _ = hq::stackfile::parse(stack.clone(), "fuzz.yml", text);
    let _ = hq::stackfile::parse_job_file(&stack, &JobName::new("job").expect("valid"), "job.yaml", text);
});
