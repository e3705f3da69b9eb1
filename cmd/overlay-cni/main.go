// Command overlay-cni is the CNI plugin of the overlay. Container
// runtimes exec it; it asks the local overlayd for an address over a Unix
// socket, creates a veth pair whose container end is born inside the
// container's network namespace, and wires address, routes and MTU. It
// keeps no state of its own: overlayd is the source of truth.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"
)

// supportedVersions are the CNI spec versions this plugin speaks.
var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

func main() {
	p := &plugin{}
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    p.cmdAdd,
		Del:    p.cmdDel,
		Check:  p.cmdCheck,
		Status: p.cmdStatus,
		GC:     p.cmdGC,
	}, version.PluginSupports(supportedVersions...), "overlay-cni: multi-host VXLAN overlay with IPAM over etcd")
}
