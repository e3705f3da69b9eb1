package daemon

import (
	"context"
	"net/http"
	"sync/atomic"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/cnirpc/rpcserver"
	"github.com/overlaynet/overlay/overlay"
)

// switchHandler is an http.Handler whose handler can be replaced while it
// serves: the CNI socket is served from the start of overlayd, by a
// handler that says it is starting, and then by the real one. It is safe
// for concurrent use.
type switchHandler struct{ h atomic.Pointer[http.Handler] }

// Set makes h serve every later request.
func (s *switchHandler) Set(h http.Handler) { s.h.Store(&h) }

func (s *switchHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	(*s.h.Load()).ServeHTTP(w, r)
}

// starting is the rpcserver.Handler of an overlayd that is not ready yet:
// every request but DEL gets "try again later" (CNI code 11), at once,
// rather than a connection refused or a wait. DEL does what the plugin
// does when overlayd is down: it deletes the host veth, and the address
// is released once overlayd is up (CNIHandler.ReleaseOrphans).
type starting struct {
	network string
	links   HostLinks
}

var _ rpcserver.Handler = starting{}

// errStarting is the answer of every request while overlayd starts.
var errStarting = &cnirpc.Error{Code: cnirpc.CodeTryAgainLater, Msg: "overlayd is starting; try again in a moment"}

func (starting) Add(context.Context, cnirpc.Request) (cnirpc.Attachment, error) {
	return cnirpc.Attachment{}, errStarting
}
func (starting) Flush(context.Context) error { return errStarting }
func (s starting) Del(_ context.Context, r cnirpc.Request) error {
	if err := checkNetwork(r.Network, s.network); err != nil {
		return err
	}
	name := cnirpc.HostVethName(s.network, overlay.AttachmentKey{ContainerID: r.ContainerID, IfName: r.IfName})
	if err := s.links.Delete(name); err != nil {
		return &cnirpc.Error{Code: cnirpc.CodeInternal, Msg: "del: delete the host veth " + name, Details: err.Error()}
	}
	return nil
}
func (starting) Check(context.Context, cnirpc.Request) (cnirpc.Attachment, error) {
	return cnirpc.Attachment{}, errStarting
}
func (starting) Status(_ context.Context, network string) (cnirpc.Status, error) {
	return cnirpc.Status{Network: network, Reason: "overlayd is starting"}, nil
}
func (starting) GC(context.Context, cnirpc.GCRequest) (cnirpc.GCResponse, error) {
	return cnirpc.GCResponse{}, errStarting
}
