// Package tools pins, in a module of its own so that the main go.mod
// stays clean, the tools the tests and benchmarks use: the reference CNI
// plugins (bridge, loopback, host-local, portmap, bandwidth) and cnitool.
// Build them all with:
//
//	go -C tools build -o DIR/ tool
package tools
