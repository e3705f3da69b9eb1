package daemon

import (
	"context"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/cnirpc/rpcserver"
	"github.com/overlaynet/overlay/overlay"
)

// starting is the rpcserver.Handler of a network that is not ready yet
// on this host (overlayd is starting, or the network was just created):
// every request but DEL gets "try again later" (CNI code 11), at once,
// rather than a connection refused or a wait. DEL does what the plugin
// does when overlayd is down: it deletes the host veth, and the address
// is released once the network is up (CNIHandler.ReleaseOrphans).
type starting struct {
	links HostLinks
	// why completes "... is starting" in the answers.
	why string
}

var _ rpcserver.Handler = starting{}

func (s starting) err() error {
	return &cnirpc.Error{Code: cnirpc.CodeTryAgainLater, Msg: s.why + " is starting; try again in a moment"}
}

func (s starting) Add(context.Context, cnirpc.Request) (cnirpc.Attachment, error) {
	return cnirpc.Attachment{}, s.err()
}
func (s starting) Flush(context.Context, string) error { return s.err() }
func (s starting) Del(_ context.Context, r cnirpc.Request) error {
	name := overlay.HostVethName(r.Network, overlay.AttachmentKey{ContainerID: r.ContainerID, IfName: r.IfName})
	if err := s.links.Delete(name); err != nil {
		return &cnirpc.Error{Code: cnirpc.CodeInternal, Msg: "del: delete the host veth " + name, Details: err.Error()}
	}
	return nil
}
func (s starting) Check(context.Context, cnirpc.Request) (cnirpc.Attachment, error) {
	return cnirpc.Attachment{}, s.err()
}
func (s starting) Status(_ context.Context, network string) (cnirpc.Status, error) {
	return cnirpc.Status{Network: network, Reason: s.why + " is starting"}, nil
}
func (s starting) GC(context.Context, cnirpc.GCRequest) (cnirpc.GCResponse, error) {
	return cnirpc.GCResponse{}, s.err()
}
