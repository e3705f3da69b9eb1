package daemon

import (
	"context"
	"errors"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/cnirpc/rpcserver"
	"github.com/overlaynet/overlay/overlay"
)

// storeTimeout bounds the store's work in one request or loop pass.
const storeTimeout = attach.StoreTimeout

// cniHandler adapts the attachment service to the CNI socket's protocol:
// it turns the plugin's requests into the service's, and the service's
// errors into CNI error codes.
type cniHandler struct{ svc *attach.Service }

var _ rpcserver.Handler = cniHandler{}

// request returns the service's request of r, which the server has
// validated (a MAC address that did not parse would be taken as none).
func request(r cnirpc.Request) attach.Request {
	mac, _ := r.HardwareAddr()
	return attach.Request{Network: r.Network, Key: overlay.AttachmentKey{ContainerID: r.ContainerID, IfName: r.IfName}, IP: r.IP,
		Endpoint: overlay.Endpoint{MAC: mac, Labels: r.Labels}}
}

func attachment(a attach.Attachment) cnirpc.Attachment {
	out := cnirpc.Attachment{Network: a.Network, Addr: a.Addr, Gateway: a.Gateway, Subnet: a.Subnet, MTU: a.MTU, Bridge: a.Bridge, New: a.New}
	if a.MAC != nil {
		out.MAC = a.MAC.String()
	}
	return out
}

// codes are the CNI error codes of the service's kinds of failure.
var codes = map[attach.Kind]uint{
	attach.Internal:       cnirpc.CodeInternal,
	attach.UnknownNetwork: cnirpc.CodeInvalidNetwork,
	attach.Starting:       cnirpc.CodeTryAgainLater,
	attach.Unavailable:    cnirpc.CodeTryAgainLater,
	attach.NoAddress:      cnirpc.CodeNoAddress,
	attach.NotFound:       cnirpc.CodeUnknownContainer,
	// The server refuses a bad MAC (code 2) or labels (code 7) before
	// the service sees them; what the service still finds is the labels.
	attach.Invalid: cnirpc.CodeInvalidNetwork,
}

// cniError returns err as a *cnirpc.Error: its message, the error
// underneath as details, and the code of its kind.
func cniError(err error) error {
	if err == nil {
		return nil
	}
	var e *attach.Error
	if !errors.As(err, &e) {
		return &cnirpc.Error{Code: cnirpc.CodeInternal, Msg: err.Error()}
	}
	out := &cnirpc.Error{Code: codes[e.Kind], Msg: e.Msg}
	if e.Err != nil {
		out.Details = e.Err.Error()
	}
	return out
}

func (h cniHandler) Add(ctx context.Context, r cnirpc.Request) (cnirpc.Attachment, error) {
	a, err := h.svc.Allocate(ctx, request(r))
	return attachment(a), cniError(err)
}

func (h cniHandler) Flush(ctx context.Context, network string) error {
	return cniError(h.svc.Flush(ctx, network))
}

func (h cniHandler) Del(ctx context.Context, r cnirpc.Request) error {
	return cniError(h.svc.Detach(ctx, request(r)))
}

func (h cniHandler) Check(ctx context.Context, r cnirpc.Request) (cnirpc.Attachment, error) {
	a, err := h.svc.Check(ctx, request(r))
	return attachment(a), cniError(err)
}

func (h cniHandler) Status(ctx context.Context, network string) (cnirpc.Status, error) {
	st, err := h.svc.Status(ctx, network)
	return cnirpc.Status{Network: st.Network, Ready: st.Ready, Degraded: st.Degraded, Reason: st.Reason, FreeAddresses: st.FreeAddresses, Peers: st.Peers}, cniError(err)
}

func (h cniHandler) GC(ctx context.Context, r cnirpc.GCRequest) (cnirpc.GCResponse, error) {
	released, err := h.svc.GC(ctx, r.Network, r.Valid)
	if released == nil {
		released = []overlay.AttachmentKey{}
	}
	return cnirpc.GCResponse{Released: released}, cniError(err)
}
