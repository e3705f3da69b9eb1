// Package tools pins the reference CNI plugins (bridge, host-local) that
// the benchmarks compare overlay-cni with, in a module of their own so the
// main go.mod stays clean. Build them with:
//
//	go -C tools build -o DIR github.com/containernetworking/plugins/plugins/main/bridge github.com/containernetworking/plugins/plugins/ipam/host-local
package tools
