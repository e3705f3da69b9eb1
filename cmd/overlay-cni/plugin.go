package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/overlay"
)

// requestTimeout bounds one exchange with overlayd.
const requestTimeout = 30 * time.Second

// NetConf is the plugin's configuration, the network's JSON on stdin.
type NetConf struct {
	types.PluginConf
	// Network is the overlay network's name; empty means the CNI
	// network's name.
	Network string `json:"network,omitempty"`
	// Socket is overlayd's socket; empty means cnirpc.DefaultSocket.
	Socket string `json:"socket,omitempty"`
	// RuntimeConfig carries what the runtime passes for the capabilities
	// the configuration declares ("ips", "mac", "labels").
	RuntimeConfig struct {
		IPs    []string        `json:"ips,omitempty"`
		MAC    string          `json:"mac,omitempty"`
		Labels json.RawMessage `json:"labels,omitempty"`
	} `json:"runtimeConfig,omitempty"`
	// Args are the runtime's arguments in the configuration (CNI
	// conventions); the plugin reads args.cni.labels, on ADD only.
	Args json.RawMessage `json:"args,omitempty"`

	// Parsed from RuntimeConfig and Args by parseRuntimeConfig: only ADD
	// uses them, so a DEL never fails over them.
	ip     netip.Addr
	mac    net.HardwareAddr
	labels map[string]string
}

// parseLabels decodes labels given as CNI's conventions give them, a
// list of {"key": k, "value": v}, or as an object {k: v}, into the map
// into. A key given twice takes its last value.
func parseLabels(field string, raw json.RawMessage, into map[string]string) error {
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	var list []struct {
		Key   *string `json:"key"`
		Value string  `json:"value"`
	}
	if err := json.Unmarshal(raw, &list); err == nil {
		for i, l := range list {
			if l.Key == nil {
				return types.NewError(types.ErrInvalidNetworkConfig, field, fmt.Sprintf("label %d has no \"key\"", i))
			}
			into[*l.Key] = l.Value
		}
		return nil
	}
	var obj map[string]string
	if err := json.Unmarshal(raw, &obj); err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, field, "want a list of {\"key\": ..., \"value\": ...} or an object of strings")
	}
	maps.Copy(into, obj)
	return nil
}

// pluginArgs are the CNI_ARGS the plugin knows: none but IgnoreUnknown,
// so any other key is an error unless IgnoreUnknown=1 is present
// (CNI conventions).
type pluginArgs struct {
	types.CommonArgs
}

// parseArgs checks CNI_ARGS.
func parseArgs(s string) error {
	if err := types.LoadArgs(s, &pluginArgs{}); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_ARGS: "+err.Error()+" (add IgnoreUnknown=1 to pass keys this plugin does not use)", s)
	}
	return nil
}

func parseConf(data []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "decode network configuration", err.Error())
	}
	if conf.Network == "" {
		conf.Network = conf.Name
	}
	if conf.Network == "" {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "network configuration has neither \"network\" nor \"name\"", "")
	}
	if conf.Socket == "" {
		conf.Socket = cnirpc.DefaultSocket
	}
	return conf, nil
}

// parseRuntimeConfig checks what only ADD uses: no ipam section, and
// runtimeConfig.ips, .mac and .labels and args.cni.labels, which it
// parses. A DEL must not fail over a value it does not need. Labels of
// runtimeConfig win over those of args with the same key.
func parseRuntimeConfig(conf *NetConf) error {
	if conf.IPAM.Type != "" {
		return types.NewError(types.ErrUnsupportedField, "ipam", fmt.Sprintf("ipam {\"type\": %q}: overlay-cni allocates addresses itself, through overlayd: remove the ipam key", conf.IPAM.Type))
	}
	switch ips := conf.RuntimeConfig.IPs; len(ips) {
	case 0:
	case 1:
		a, err := netip.ParsePrefix(ips[0])
		if err != nil {
			if a2, err2 := netip.ParseAddr(ips[0]); err2 == nil {
				a, err = netip.PrefixFrom(a2, a2.BitLen()), nil
			}
		}
		if err != nil || !a.Addr().Is4() {
			return types.NewError(types.ErrUnsupportedField, "runtimeConfig.ips", fmt.Sprintf("%q is not an IPv4 address", ips[0]))
		}
		conf.ip = a.Addr()
	default:
		return types.NewError(types.ErrUnsupportedField, "runtimeConfig.ips", fmt.Sprintf("one IPv4 address per interface, got %d", len(ips)))
	}
	if m := conf.RuntimeConfig.MAC; m != "" {
		mac, err := net.ParseMAC(m)
		if err == nil {
			err = overlay.ValidateMAC(mac)
		}
		if err != nil {
			return types.NewError(types.ErrUnsupportedField, "runtimeConfig.mac", fmt.Sprintf("%q is not a unicast Ethernet address", m))
		}
		conf.mac = mac
	}
	var args struct {
		CNI struct {
			Labels json.RawMessage `json:"labels"`
		} `json:"cni"`
	}
	if len(conf.Args) > 0 {
		if err := json.Unmarshal(conf.Args, &args); err != nil {
			return types.NewError(types.ErrInvalidNetworkConfig, "args", "want an object, with labels in args.cni.labels: "+err.Error())
		}
	}
	labels := make(map[string]string)
	if err := parseLabels("args.cni.labels", args.CNI.Labels, labels); err != nil {
		return err
	}
	if err := parseLabels("runtimeConfig.labels", conf.RuntimeConfig.Labels, labels); err != nil {
		return err
	}
	if err := (overlay.Endpoint{Labels: labels}).Validate(); err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "endpoint labels", err.Error())
	}
	if len(labels) > 0 {
		conf.labels = labels
	}
	return nil
}

// plugin holds the verbs; it has no state.
type plugin struct{}

// hostVethName is the name of the host end of this attachment's veth.
func hostVethName(conf *NetConf, args *skel.CmdArgs) string {
	return overlay.HostVethName(conf.Network, overlay.AttachmentKey{ContainerID: args.ContainerID, IfName: args.IfName})
}

// request names the container interface of args on conf's network, with
// what ADD asks for: an address, a MAC address and labels.
func request(conf *NetConf, args *skel.CmdArgs) cnirpc.Request {
	r := cnirpc.Request{Network: conf.Network, ContainerID: args.ContainerID, IfName: args.IfName, IP: conf.ip, Labels: conf.labels}
	if conf.mac != nil {
		r.MAC = conf.mac.String()
	}
	return r
}

// rpcError turns a failure to talk to overlayd into the CNI error JSON.
func rpcError(op string, err error) error {
	var e *cnirpc.Error
	if errors.As(err, &e) {
		return types.NewError(e.Code, e.Msg, e.Details)
	}
	if errors.Is(err, cnirpc.ErrUnavailable) {
		return types.NewError(types.ErrTryAgainLater, "overlayd is not reachable: is it running?", err.Error())
	}
	if errors.Is(err, cnirpc.ErrNoAnswer) {
		return types.NewError(types.ErrTryAgainLater, "overlayd did not answer", err.Error())
	}
	return types.NewError(types.ErrInternal, op+" failed", err.Error())
}

func (p *plugin) cmdAdd(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if err := parseRuntimeConfig(conf); err != nil {
		return err
	}
	if err := parseArgs(args.Args); err != nil {
		return err
	}
	if conf.mac == nil {
		// The plugin picks the MAC address, not the kernel, so that
		// overlayd records the one the container gets.
		conf.mac = overlay.RandomMAC()
	}
	// The namespace before overlayd: a CNI_NETNS that is not one fails
	// with code 8 before an address is allocated.
	cont, err := openContainer(args.Netns)
	if err != nil {
		return err
	}
	defer cont.Close()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	client := cnirpc.NewClient(conf.Socket)
	// overlayd answers as soon as the address is decided and confirms
	// once it is on disk: the veth is made meanwhile, and the result is
	// printed only after the confirmation.
	att, pending, err := client.AddEarly(ctx, request(conf, args))
	if err != nil {
		return rpcError("add", err)
	}
	defer pending.Close()
	result, err := attach(conf, args, cont, att, func() error {
		if err := pending.Wait(); err != nil {
			return rpcError("add", err)
		}
		return nil
	})
	if err != nil {
		// Leave nothing behind: the address goes back only if this ADD
		// allocated it, so a failed second ADD keeps the first intact,
		// and only once no veth holds it.
		var keep *keepAddress
		if att.New && !errors.As(err, &keep) {
			if derr := client.Del(ctx, request(conf, args)); derr != nil {
				fmt.Fprintf(os.Stderr, "overlay-cni: release address after failed ADD: %v\n", derr)
			}
		}
		return err
	}
	return types.PrintResult(result, conf.CNIVersion)
}

func (p *plugin) cmdDel(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	// overlayd detaches the host veth at once (traffic stops), deletes it
	// and then releases the address in the background: the kernel's
	// deletion of a veth is most of what a DEL would otherwise wait for.
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	err = cnirpc.NewClient(conf.Socket).Del(ctx, request(conf, args))
	if errors.Is(err, cnirpc.ErrUnavailable) {
		// Nothing leaks: the plugin deletes the veth itself (from its
		// name alone; the container end goes with it), and overlayd
		// releases the address when it starts again, as it releases
		// every address whose veth is gone.
		if derr := deleteHostVeth(hostVethName(conf, args)); derr != nil {
			return types.NewError(types.ErrInternal, "delete host veth", derr.Error())
		}
		fmt.Fprintf(os.Stderr, "overlay-cni: DEL %s/%s: overlayd unreachable; the veth is removed and overlayd releases the address when it is back: %v\n", args.ContainerID, args.IfName, err)
		return nil
	}
	if err != nil {
		return rpcError("del", err)
	}
	return nil
}

// gcConf is what GC reads besides NetConf: the attachments still in use.
// The spec names the key cni.dev/valid-attachments; the 1.1.0 tag of the
// spec named it cni.dev/attachments, and libcni sends both.
type gcConf struct {
	Valid  []types.GCAttachment `json:"cni.dev/valid-attachments"`
	Legacy []types.GCAttachment `json:"cni.dev/attachments"`
}

// cmdGC releases the addresses and removes the host veths of every
// attachment of the network on this host that the runtime no longer
// lists. A missing list means nothing is valid. It prints nothing.
func (p *plugin) cmdGC(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	var gc gcConf
	if err := json.Unmarshal(args.StdinData, &gc); err != nil {
		return types.NewError(types.ErrDecodingFailure, "decode valid attachments", err.Error())
	}
	req := cnirpc.GCRequest{Network: conf.Network, Valid: []overlay.AttachmentKey{}}
	keep := make(map[string]bool)
	for _, a := range append(gc.Valid, gc.Legacy...) {
		k := overlay.AttachmentKey{ContainerID: a.ContainerID, IfName: a.IfName}
		if keep[overlay.HostVethName(conf.Network, k)] {
			continue
		}
		keep[overlay.HostVethName(conf.Network, k)] = true
		req.Valid = append(req.Valid, k)
	}
	// Veths first: an address is released only once no veth holds it.
	bridge := overlay.Network{Name: conf.Network}.BridgeName()
	if err := deleteStaleVeths(bridge, keep); err != nil {
		return types.NewError(types.ErrInternal, "gc: remove stale veths", err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	if _, err := cnirpc.NewClient(conf.Socket).GC(ctx, req); err != nil {
		return rpcError("gc", err)
	}
	return nil
}

func (p *plugin) cmdCheck(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return types.NewError(types.ErrDecodingFailure, "decode prevResult", err.Error())
	}
	cont, err := openContainer(args.Netns)
	if err != nil {
		return err
	}
	defer cont.Close()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	att, err := cnirpc.NewClient(conf.Socket).Check(ctx, request(conf, args))
	if err != nil {
		return rpcError("check", err)
	}
	if conf.PrevResult != nil {
		prev, err := current.NewResultFromResult(conf.PrevResult)
		if err != nil {
			return types.NewError(types.ErrDecodingFailure, "convert prevResult", err.Error())
		}
		if !hasIP(prev, att.Addr) {
			return types.NewError(types.ErrInternal, fmt.Sprintf("prevResult does not hold overlayd's address %s for this container", att.Addr), "")
		}
	}
	return checkNamespace(cont, args, att)
}

func hasIP(r *current.Result, p netip.Prefix) bool {
	for _, ip := range r.IPs {
		if a, ok := netip.AddrFromSlice(ip.Address.IP); ok && a.Unmap() == p.Addr() {
			return true
		}
	}
	return false
}

// keepAddress marks an ADD failure after which the address must stay
// allocated, because an interface may still hold it. DEL releases it.
type keepAddress struct{ err *types.Error }

func (k *keepAddress) Error() string { return k.err.Error() }
func (k *keepAddress) Unwrap() error { return k.err }

// cmdStatus answers whether an ADD can be served now: code 50 when
// overlayd cannot be reached or cannot allocate.
func (p *plugin) cmdStatus(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	st, err := cnirpc.NewClient(conf.Socket).Status(ctx, conf.Network)
	var e *cnirpc.Error
	switch {
	case errors.As(err, &e):
		return types.NewError(types.ErrPluginNotAvailable, "overlayd cannot serve ADD: "+e.Msg, e.Details)
	case err != nil:
		return types.NewError(types.ErrPluginNotAvailable, "overlayd is not reachable: is it running?", err.Error())
	case !st.Ready:
		return types.NewError(types.ErrPluginNotAvailable, "overlayd cannot serve ADD: "+st.Reason, "")
	case st.Degraded:
		return types.NewError(types.ErrLimitedConnectivity, "existing containers may have lost connectivity: "+st.Reason, "")
	}
	return nil
}
