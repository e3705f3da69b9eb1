// Package doccheck holds a test that keeps docs/ true of the code: every
// quoted log message in the documentation must exist in the code. It has
// no code of its own. (The metric names the docs use are checked against
// overlayd's registry itself, by the metrics package's TestDocumented.)
//
// A log message is quoted in the docs as the text handler prints it:
// msg="allocations copied to etcd again" or msg=ready. It must be a
// string literal of the code, whole, or two literals joined (the code
// builds some messages as "added "+kind).
package doccheck
