// Package doccheck holds a test that keeps docs/ true of the code: every
// metric name and every quoted log message in the documentation must
// exist in the code, and every metric overlayd registers must be in
// docs/metrics.md. It has no code of its own.
//
// A log message is quoted in the docs as the text handler prints it:
// msg="allocations copied to etcd again" or msg=ready. It must be a
// string literal of the code, whole, or two literals joined (the code
// builds some messages as "added "+kind).
package doccheck
