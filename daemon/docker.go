package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/cnm"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/hostlink"
)

// The Docker driver: cnm's Backend over the attachment service, a thin
// adapter like the CNI socket's. The IPAM half hands out addresses of
// this host's blocks; the network half maps each Docker network (local
// to its dockerd, see package cnm) onto an overlay network, creating it
// on the first host, and wires endpoints with veth pairs whose host end
// is on the network's bridge, as the CNI plugin does.

// dockerKeyPrefix starts the container IDs of the attachments the Docker
// driver makes: dockerd asks for an address before it names the
// endpoint.
const dockerKeyPrefix = attach.DockerKeyPrefix

// dockerIfName is the interface name of the Docker driver's attachments.
const dockerIfName = "eth0"

// dockerDefaultPools is where a pool is chosen for a network created
// without --subnet: /16s of this range that no network and no route of
// the host overlaps.
var dockerDefaultPools = netip.MustParsePrefix("10.128.0.0/10")

// dockerStore is what the Docker driver needs of etcd (etcd.Store).
type dockerStore interface {
	Networks(ctx context.Context) ([]overlay.Network, error)
	Network(ctx context.Context, name string) (overlay.Network, error)
	CreateNetwork(ctx context.Context, n overlay.Network, vnis etcd.VNIRange) (overlay.Network, error)
	PutDockerNetwork(ctx context.Context, h overlay.HostID, id, name string) error
	DockerNetwork(ctx context.Context, h overlay.HostID, id string) (string, error)
	DeleteDockerNetwork(ctx context.Context, h overlay.HostID, id string) error
	PutDockerEndpoint(ctx context.Context, h overlay.HostID, id string, ep etcd.DockerEndpoint) error
	DockerEndpoint(ctx context.Context, h overlay.HostID, id string) (etcd.DockerEndpoint, error)
	DockerEndpoints(ctx context.Context, h overlay.HostID) (map[string]etcd.DockerEndpoint, error)
	DeleteDockerEndpoint(ctx context.Context, h overlay.HostID, id string) error
}

// dockerService is what the Docker driver needs of the attachment
// service (attach.Service).
type dockerService interface {
	Allocate(ctx context.Context, r attach.Request) (attach.Attachment, error)
	Flush(ctx context.Context, network string) error
	Detach(ctx context.Context, r attach.Request) error
	Allocations(ctx context.Context, network string) ([]overlay.Allocation, error)
	Holder(ctx context.Context, network string, a netip.Addr) (overlay.Allocation, error)
}

// dockerLinks makes and removes the endpoints' veth pairs.
type dockerLinks interface {
	// AddVeth creates the pair, its peer in the host's namespace for
	// dockerd to move into the container.
	AddVeth(v hostlink.Veth) error
	// Delete deletes a link and its peer; one that does not exist is
	// not an error.
	Delete(name string) error
	// IfIndex returns a link's index.
	IfIndex(name string) (int, error)
	// State says whether a host veth exists and is attached.
	State(name string) (hostlink.State, error)
}

// dockerBackend is the Docker driver of one host. It is safe for
// concurrent use.
type dockerBackend struct {
	host   overlay.HostID
	store  dockerStore
	svc    dockerService
	links  dockerLinks
	routes func() ([]netip.Prefix, error) // the host's IPv4 routes
	log    *slog.Logger

	mu   sync.Mutex
	nets map[string]string // Docker network ID → overlay network name, as read
	// unwired are the Docker attachments the last sweep found without
	// a veth (see Sweep).
	unwired map[dockerAttachment]netip.Prefix
}

// dockerAttachment is one Docker attachment of one network.
type dockerAttachment struct {
	network string
	key     overlay.AttachmentKey
}

var _ cnm.Backend = (*dockerBackend)(nil)

// parsePool parses a pool ID or pool: an IPv4 prefix.
func parsePool(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil || !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("%q is not an IPv4 subnet (A.B.C.D/N)", s)
	}
	return p.Masked(), nil
}

// RequestPool answers a network's pool: that of the overlay network
// --ipam-opt network=NAME names, or --subnet (the network of that CIDR,
// or one to be created by CreateNetwork), or a free /16 of
// dockerDefaultPools. The pool ID is the CIDR: the same pool always has
// the same ID, on every host.
func (b *dockerBackend) RequestPool(ctx context.Context, r cnm.RequestPoolRequest) (cnm.RequestPoolResponse, error) {
	if r.V6 {
		return cnm.RequestPoolResponse{}, errors.New("IPv6 is not supported by this driver: leave out --ipv6")
	}
	if r.SubPool != "" {
		return cnm.RequestPoolResponse{}, fmt.Errorf("--ip-range %s is not supported: each host hands out the addresses of its own blocks", r.SubPool)
	}
	for k := range r.Options {
		if k != "network" {
			return cnm.RequestPoolResponse{}, fmt.Errorf("unknown --ipam-opt %q (known: network=NAME, an overlay network)", k)
		}
	}
	var want netip.Prefix
	if r.Pool != "" {
		p, err := parsePool(r.Pool)
		if err != nil {
			return cnm.RequestPoolResponse{}, fmt.Errorf("--subnet: %w", err)
		}
		want = p
	}
	if name := r.Options["network"]; name != "" {
		n, err := b.store.Network(ctx, name)
		if errors.Is(err, overlay.ErrNotFound) {
			return cnm.RequestPoolResponse{}, fmt.Errorf("--ipam-opt network=%s: no such overlay network: create it with overlayctl network create %s --cidr ..., or give --subnet without it", name, name)
		}
		if err != nil {
			return cnm.RequestPoolResponse{}, err
		}
		if !want.IsValid() {
			// dockerd checks a pool it did not ask for by subnet against
			// the host's routes, and asks again, without end, while it
			// overlaps one: a network served here is routed here.
			return cnm.RequestPoolResponse{}, fmt.Errorf("--ipam-opt network=%s: give --subnet %s too (dockerd refuses a pool it did not name that overlaps this host's routes, and the network's blocks are routed here)", name, n.CIDR)
		}
		if want != n.CIDR {
			return cnm.RequestPoolResponse{}, fmt.Errorf("--subnet %s differs from network %s's %s: give %s", want, name, n.CIDR, n.CIDR)
		}
		return pool(n.CIDR), nil
	}
	nets, err := b.store.Networks(ctx)
	if err != nil && nets == nil {
		return cnm.RequestPoolResponse{}, fmt.Errorf("list the overlay networks: %w", err)
	}
	if want.IsValid() {
		for _, n := range nets {
			if n.CIDR == want {
				return pool(want), nil
			}
			if n.CIDR.Overlaps(want) {
				return cnm.RequestPoolResponse{}, fmt.Errorf("--subnet %s overlaps network %s (%s): give %s to join it, or a subnet of its own", want, n.Name, n.CIDR, n.CIDR)
			}
		}
		return pool(want), nil
	}
	taken := make([]netip.Prefix, 0, len(nets))
	for _, n := range nets {
		taken = append(taken, n.CIDR)
	}
	if b.routes != nil {
		rs, err := b.routes()
		if err != nil {
			return cnm.RequestPoolResponse{}, fmt.Errorf("list this host's routes to choose a free subnet: %w", err)
		}
		for _, r := range rs {
			if r.Bits() > 0 { // the default route overlaps everything
				taken = append(taken, r)
			}
		}
	}
	for p := dockerDefaultPools.Addr(); dockerDefaultPools.Contains(p); {
		cand := netip.PrefixFrom(p, 16)
		if !slices.ContainsFunc(taken, cand.Overlaps) {
			return pool(cand), nil
		}
		next := p.As4()
		next[1]++
		p = netip.AddrFrom4(next)
	}
	return cnm.RequestPoolResponse{}, fmt.Errorf("no /16 of %s is free of networks and routes: give --subnet", dockerDefaultPools)
}

func pool(p netip.Prefix) cnm.RequestPoolResponse {
	return cnm.RequestPoolResponse{PoolID: p.String(), Pool: p.String()}
}

// ReleasePool does nothing: a pool is an overlay network's address
// space, which outlives any one dockerd's network.
func (b *dockerBackend) ReleasePool(context.Context, cnm.ReleasePoolRequest) error { return nil }

// networkOf returns the overlay network whose CIDR is pool.
func (b *dockerBackend) networkOf(ctx context.Context, poolID string) (overlay.Network, error) {
	p, err := parsePool(poolID)
	if err != nil {
		return overlay.Network{}, fmt.Errorf("pool %s: %w", poolID, err)
	}
	nets, err := b.store.Networks(ctx)
	if err != nil && nets == nil {
		return overlay.Network{}, fmt.Errorf("list the overlay networks: %w", err)
	}
	for _, n := range nets {
		if n.CIDR == p {
			return n, nil
		}
	}
	return overlay.Network{}, fmt.Errorf("no overlay network has the subnet %s: create the Docker network with -d and --ipam-driver both this driver, or the overlay network with overlayctl first", p)
}

// RequestAddress gives an endpoint an address of this host's blocks (or
// the one asked for, --ip), recorded durably before it answers. The
// network's gateway is no address of any host's: each host's gateway is
// that of its own block, which Join gives the container; the gateway
// dockerd asks for is answered with the pool's first address and
// reserves nothing.
func (b *dockerBackend) RequestAddress(ctx context.Context, r cnm.RequestAddressRequest) (cnm.RequestAddressResponse, error) {
	if r.Options[cnm.RequestAddressTypeOption] == cnm.GatewayAddressType {
		p, err := parsePool(r.PoolID)
		if err != nil {
			return cnm.RequestAddressResponse{}, err
		}
		return cnm.RequestAddressResponse{Address: netip.PrefixFrom(p.Addr().Next(), p.Bits()).String()}, nil
	}
	n, err := b.networkOf(ctx, r.PoolID)
	if err != nil {
		return cnm.RequestAddressResponse{}, err
	}
	req := attach.Request{Network: n.Name, Key: overlay.AttachmentKey{ContainerID: dockerKeyPrefix + randomHex(16), IfName: dockerIfName},
		Endpoint: overlay.Endpoint{MAC: overlay.RandomMAC()}}
	if r.Address != "" {
		a, err := netip.ParseAddr(r.Address)
		if err != nil || !a.Is4() {
			return cnm.RequestAddressResponse{}, fmt.Errorf("--ip %q is not an IPv4 address", r.Address)
		}
		req.IP = a
	}
	att, err := b.svc.Allocate(ctx, req)
	if err != nil {
		return cnm.RequestAddressResponse{}, err
	}
	if err := b.svc.Flush(ctx, n.Name); err != nil {
		return cnm.RequestAddressResponse{}, err
	}
	b.log.Debug("docker: allocated", "network", n.Name, "addr", att.Addr, "key", req.Key)
	return cnm.RequestAddressResponse{Address: att.Addr.String()}, nil
}

// ReleaseAddress releases an endpoint's address; the gateway's, and an
// address nobody holds, are no error. dockerd names only the address, so
// a release that comes late (from a dockerd that cleans up after a crash,
// once the address has been collected by Sweep and given again) must not
// take it from its new holder: the address is released only when a
// Docker attachment holds it that no endpoint record refers to and whose
// veth is not attached, which is how dockerd leaves it when it means it
// (after Leave and DeleteEndpoint, or after a CreateEndpoint that
// failed). Otherwise it is left, and the refusal logged.
func (b *dockerBackend) ReleaseAddress(ctx context.Context, r cnm.ReleaseAddressRequest) error {
	a, err := netip.ParseAddr(r.Address)
	if err != nil {
		return fmt.Errorf("release address %q: not an IP address", r.Address)
	}
	n, err := b.networkOf(ctx, r.PoolID)
	if err != nil {
		return err
	}
	al, err := b.svc.Holder(ctx, n.Name, a)
	if attach.KindOf(err) == attach.NotFound {
		return nil
	}
	if err != nil {
		return err
	}
	if why, err := b.inUse(ctx, n.Name, al.Key); err != nil {
		return err
	} else if why != "" {
		b.log.Warn("docker: a release of an address in use, left alone", "network", n.Name, "addr", a, "holder", al.Key, "because", why)
		return nil
	}
	if err := b.svc.Detach(ctx, attach.Request{Network: n.Name, Key: al.Key}); err != nil {
		return err
	}
	b.log.Debug("docker: released", "network", n.Name, "addr", a, "key", al.Key)
	return nil
}

// inUse says why attachment key of network is not dockerd's to release,
// or "".
func (b *dockerBackend) inUse(ctx context.Context, network string, key overlay.AttachmentKey) (string, error) {
	if !strings.HasPrefix(key.ContainerID, dockerKeyPrefix) {
		return "a CNI container holds it", nil
	}
	state, err := b.links.State(overlay.HostVethName(network, key))
	if err != nil {
		return "", fmt.Errorf("read the veth of %s: %w", key, err)
	}
	if state == hostlink.Attached {
		return "its endpoint's veth is attached", nil
	}
	eps, err := b.store.DockerEndpoints(ctx, b.host)
	if err != nil && eps == nil {
		return "", fmt.Errorf("read this host's Docker endpoints: %w", err)
	}
	for id, ep := range eps {
		if ep.Network == network && ep.Key == key {
			return "endpoint " + id + " has it", nil
		}
	}
	return "", nil
}

// dockerNetworkOptions are the --opt keys of a network the driver
// creates, beside label.KEY.
var dockerNetworkOptions = []string{"name", "vni", "mtu", "block-bits", "masquerade"}

// dockerLabelOption starts the --opt keys that are the network's labels:
// dockerd gives a remote driver no --label.
const dockerLabelOption = "label."

// CreateNetwork maps Docker network r.NetworkID onto the overlay network
// of its pool, creating it (named --opt name=NAME, else docker-<ID>) on
// the first host; on the others, the one of the same subnet (or name)
// is used, and options that differ from it are refused.
func (b *dockerBackend) CreateNetwork(ctx context.Context, r cnm.CreateNetworkRequest) error {
	if len(r.IPv6Data) > 0 {
		return errors.New("IPv6 is not supported by this driver: leave out --ipv6")
	}
	if len(r.IPv4Data) != 1 {
		return fmt.Errorf("want one IPv4 subnet, got %d: give one --subnet", len(r.IPv4Data))
	}
	p, err := parsePool(r.IPv4Data[0].Pool)
	if err != nil {
		return err
	}
	if len(r.IPv4Data[0].AuxAddresses) > 0 {
		return errors.New("--aux-address is not supported: each host hands out the addresses of its own blocks")
	}
	opts, err := genericOptions(r.Options)
	if err != nil {
		return err
	}
	for k := range opts {
		if !slices.Contains(dockerNetworkOptions, k) && !strings.HasPrefix(k, dockerLabelOption) {
			return fmt.Errorf("unknown --opt %q (known: %s, %sKEY)", k, strings.Join(dockerNetworkOptions, ", "), dockerLabelOption)
		}
	}
	want := overlay.Network{Name: opts["name"], CIDR: p, BlockBits: overlay.DefaultBlockBits, Port: overlay.DefaultPort}
	if want.Name == "" {
		want.Name = "docker-" + r.NetworkID[:min(12, len(r.NetworkID))]
	}
	if err := parseNetworkOptions(opts, &want); err != nil {
		return err
	}
	nets, err := b.store.Networks(ctx)
	if err != nil && nets == nil {
		return fmt.Errorf("list the overlay networks: %w", err)
	}
	var n overlay.Network
	found := false
	for _, have := range nets {
		if have.CIDR == p || have.Name == want.Name {
			if have.CIDR != p {
				return fmt.Errorf("overlay network %s has the subnet %s, not %s: give --subnet %s", have.Name, have.CIDR, p, have.CIDR)
			}
			if opts["name"] != "" && have.Name != opts["name"] {
				return fmt.Errorf("the subnet %s is overlay network %s's: leave out --opt name, or give name=%s", p, have.Name, have.Name)
			}
			if why := optionsDiffer(opts, want, have); why != "" {
				return fmt.Errorf("overlay network %s exists with %s: leave the option out, or make it the same", have.Name, why)
			}
			n, found = have, true
			break
		}
	}
	if !found {
		if n, err = b.store.CreateNetwork(ctx, want, etcd.DefaultVNIRange); err != nil {
			return err
		}
		b.log.Info("docker: created an overlay network", "network", n.Name, "cidr", n.CIDR, "vni", n.VNI, "docker-network", r.NetworkID)
	}
	if err := b.store.PutDockerNetwork(ctx, b.host, r.NetworkID, n.Name); err != nil {
		return err
	}
	b.mu.Lock()
	b.nets[r.NetworkID] = n.Name
	b.mu.Unlock()
	return nil
}

// genericOptions returns the --opt values of a CreateNetwork's options.
func genericOptions(options map[string]any) (map[string]string, error) {
	out := map[string]string{}
	g, ok := options[cnm.GenericOption]
	if !ok || g == nil {
		return out, nil
	}
	m, ok := g.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("%s: want a map of options, got %T", cnm.GenericOption, g)
	}
	for k, v := range m {
		s, ok := v.(string)
		if !ok {
			return nil, fmt.Errorf("--opt %s: want a string, got %T", k, v)
		}
		out[k] = s
	}
	return out, nil
}

// parseNetworkOptions sets n's fields from --opt values.
func parseNetworkOptions(opts map[string]string, n *overlay.Network) error {
	num := func(k string, bits int) (uint64, bool, error) {
		v, ok := opts[k]
		if !ok {
			return 0, false, nil
		}
		x, err := strconv.ParseUint(v, 10, bits)
		if err != nil {
			return 0, false, fmt.Errorf("--opt %s=%s: not a number", k, v)
		}
		return x, true, nil
	}
	if v, ok, err := num("vni", 24); err != nil {
		return err
	} else if ok {
		n.VNI = uint32(v)
	}
	if v, ok, err := num("mtu", 16); err != nil {
		return err
	} else if ok {
		n.MTU = int(v)
	}
	if v, ok, err := num("block-bits", 8); err != nil {
		return err
	} else if ok {
		n.BlockBits = int(v)
	}
	if v, ok := opts["masquerade"]; ok {
		on, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("--opt masquerade=%s: want true or false", v)
		}
		n.Masquerade = &on
	}
	for k, v := range opts {
		if key, ok := strings.CutPrefix(k, dockerLabelOption); ok {
			if n.Labels == nil {
				n.Labels = map[string]string{}
			}
			n.Labels[key] = v
		}
	}
	if err := overlay.ValidateLabels(n.Labels); err != nil {
		return fmt.Errorf("--opt %sKEY=VALUE: %w", dockerLabelOption, err)
	}
	return nil
}

// optionsDiffer says which of the options given differ from the existing
// network have, or "".
func optionsDiffer(opts map[string]string, want, have overlay.Network) string {
	var out []string
	if _, ok := opts["vni"]; ok && want.VNI != have.VNI {
		out = append(out, fmt.Sprintf("vni %d", have.VNI))
	}
	if _, ok := opts["mtu"]; ok && want.MTU != have.MTU {
		out = append(out, fmt.Sprintf("mtu %d", have.MTU))
	}
	if _, ok := opts["block-bits"]; ok && want.BlockBits != have.BlockBits {
		out = append(out, fmt.Sprintf("block-bits %d", have.BlockBits))
	}
	if _, ok := opts["masquerade"]; ok && want.MasqueradeOn() != have.MasqueradeOn() {
		out = append(out, fmt.Sprintf("masquerade %t", have.MasqueradeOn()))
	}
	keys := slices.Sorted(maps.Keys(want.Labels))
	for _, k := range keys {
		if v, ok := have.Labels[k]; !ok || v != want.Labels[k] {
			if ok {
				out = append(out, fmt.Sprintf("label %s=%s", k, v))
			} else {
				out = append(out, fmt.Sprintf("no label %s", k))
			}
		}
	}
	return strings.Join(out, ", ")
}

// dockerNetwork returns the overlay network Docker network id stands for.
func (b *dockerBackend) dockerNetwork(ctx context.Context, id string) (string, error) {
	b.mu.Lock()
	name, ok := b.nets[id]
	b.mu.Unlock()
	if ok {
		return name, nil
	}
	name, err := b.store.DockerNetwork(ctx, b.host, id)
	if errors.Is(err, overlay.ErrNotFound) {
		return "", fmt.Errorf("network %s of dockerd is not one of this driver's on this host: recreate it (docker network rm, then create)", id)
	}
	if err != nil {
		return "", err
	}
	b.mu.Lock()
	b.nets[id] = name
	b.mu.Unlock()
	return name, nil
}

// DeleteNetwork forgets Docker network r.NetworkID on this host. The
// overlay network stays: other hosts' dockerds, and CNI containers, may
// use it; overlayctl network delete removes it.
func (b *dockerBackend) DeleteNetwork(ctx context.Context, r cnm.NetworkRequest) error {
	if err := b.store.DeleteDockerNetwork(ctx, b.host, r.NetworkID); err != nil {
		return err
	}
	b.mu.Lock()
	delete(b.nets, r.NetworkID)
	b.mu.Unlock()
	return nil
}

// CreateEndpoint records endpoint r.EndpointID: the attachment that holds
// its address, and its MAC address, which it answers.
func (b *dockerBackend) CreateEndpoint(ctx context.Context, r cnm.CreateEndpointRequest) (cnm.CreateEndpointResponse, error) {
	name, err := b.dockerNetwork(ctx, r.NetworkID)
	if err != nil {
		return cnm.CreateEndpointResponse{}, err
	}
	if r.Interface == nil || r.Interface.Address == "" {
		return cnm.CreateEndpointResponse{}, errors.New("the endpoint has no IPv4 address: use this driver as the network's --ipam-driver too")
	}
	if r.Interface.AddressIPv6 != "" {
		return cnm.CreateEndpointResponse{}, errors.New("IPv6 is not supported by this driver")
	}
	addr, err := netip.ParsePrefix(r.Interface.Address)
	if err != nil {
		return cnm.CreateEndpointResponse{}, fmt.Errorf("the endpoint's address %q: %w", r.Interface.Address, err)
	}
	al, err := b.svc.Holder(ctx, name, addr.Addr())
	if err != nil {
		return cnm.CreateEndpointResponse{}, fmt.Errorf("the endpoint's address %s: %w", addr, err)
	}
	if !strings.HasPrefix(al.Key.ContainerID, dockerKeyPrefix) {
		return cnm.CreateEndpointResponse{}, fmt.Errorf("address %s is held by container %s, not by this driver: use this driver as the network's --ipam-driver", addr.Addr(), al.Key)
	}
	ep := etcd.DockerEndpoint{Network: name, Addr: al.Addr, Key: al.Key, MAC: al.Endpoint.MAC.String()}
	if err := b.store.PutDockerEndpoint(ctx, b.host, r.EndpointID, ep); err != nil {
		return cnm.CreateEndpointResponse{}, err
	}
	resp := cnm.CreateEndpointResponse{}
	if r.Interface.MacAddress == "" && al.Endpoint.MAC != nil {
		resp.Interface = &cnm.EndpointInterface{MacAddress: al.Endpoint.MAC.String()}
	}
	return resp, nil
}

// endpoint returns endpoint id's record.
func (b *dockerBackend) endpoint(ctx context.Context, id string) (etcd.DockerEndpoint, error) {
	ep, err := b.store.DockerEndpoint(ctx, b.host, id)
	if errors.Is(err, overlay.ErrNotFound) {
		return ep, fmt.Errorf("endpoint %s is not one of this driver's on this host", id)
	}
	return ep, err
}

// EndpointOperInfo reports an endpoint's address, MAC address and host.
func (b *dockerBackend) EndpointOperInfo(ctx context.Context, r cnm.EndpointRequest) (cnm.EndpointOperInfoResponse, error) {
	ep, err := b.endpoint(ctx, r.EndpointID)
	if err != nil {
		return cnm.EndpointOperInfoResponse{}, err
	}
	return cnm.EndpointOperInfoResponse{Value: map[string]any{"network": ep.Network, "address": ep.Addr.String(), "mac": ep.MAC, "host": string(b.host)}}, nil
}

// DeleteEndpoint forgets an endpoint and deletes a veth left by a Leave
// that never came; its address is released by ReleaseAddress.
func (b *dockerBackend) DeleteEndpoint(ctx context.Context, r cnm.EndpointRequest) error {
	ep, err := b.store.DockerEndpoint(ctx, b.host, r.EndpointID)
	if errors.Is(err, overlay.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := b.links.Delete(overlay.HostVethName(ep.Network, ep.Key)); err != nil {
		return err
	}
	return b.store.DeleteDockerEndpoint(ctx, b.host, r.EndpointID)
}

// dockerPeerPrefix starts the names of the container ends of the veth
// pairs before dockerd moves them into their container.
const dockerPeerPrefix = "ovd"

// Join makes the endpoint's veth pair: the host end on the network's
// bridge, the container end, with the endpoint's MAC address, in the
// host's namespace for dockerd to move into the sandbox as eth<N>. The
// gateway is that of the block the address is in, on this host's bridge,
// as a CNI container's; dockerd then adds no gateway bridge of its own.
func (b *dockerBackend) Join(ctx context.Context, r cnm.JoinRequest) (cnm.JoinResponse, error) {
	ep, err := b.endpoint(ctx, r.EndpointID)
	if err != nil {
		return cnm.JoinResponse{}, err
	}
	// The attachment holds its address already: Allocate returns it,
	// with the bridge, MTU and gateway to wire it.
	att, err := b.svc.Allocate(ctx, attach.Request{Network: ep.Network, Key: ep.Key})
	if err != nil {
		return cnm.JoinResponse{}, err
	}
	if att.Addr != ep.Addr {
		return cnm.JoinResponse{}, fmt.Errorf("endpoint %s: its attachment holds %s, not %s: recreate the container", r.EndpointID, att.Addr, ep.Addr)
	}
	bridge, err := b.links.IfIndex(att.Bridge)
	if err != nil {
		return cnm.JoinResponse{}, fmt.Errorf("bridge %s not found: overlayd has not programmed this host's network %s yet; try again", att.Bridge, ep.Network)
	}
	mac, err := net.ParseMAC(ep.MAC)
	if err != nil {
		mac = nil
	}
	peer := dockerPeerPrefix + r.EndpointID[:min(11, len(r.EndpointID))]
	self, err := netns.Get()
	if err != nil {
		return cnm.JoinResponse{}, fmt.Errorf("this host's network namespace: %w", err)
	}
	defer self.Close()
	host := overlay.HostVethName(ep.Network, ep.Key)
	if err := b.links.AddVeth(hostlink.Veth{HostName: host, HostMAC: overlay.RandomMAC(), Master: bridge, MTU: att.MTU, PeerName: peer, PeerMAC: mac, PeerNS: self}); err != nil {
		return cnm.JoinResponse{}, fmt.Errorf("create the veth pair %s/%s: %w", host, peer, err)
	}
	return cnm.JoinResponse{InterfaceName: cnm.InterfaceName{SrcName: peer, DstPrefix: "eth"}, Gateway: att.Gateway.String()}, nil
}

// Leave deletes the endpoint's veth pair. An endpoint without a record
// (Sweep collected it: its container went while dockerd was down) has
// none to delete.
func (b *dockerBackend) Leave(ctx context.Context, r cnm.EndpointRequest) error {
	ep, err := b.store.DockerEndpoint(ctx, b.host, r.EndpointID)
	if errors.Is(err, overlay.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	return b.links.Delete(overlay.HostVethName(ep.Network, ep.Key))
}

// Sweep collects, every interval until ctx is done, the Docker
// attachments of networks() that dockerd will not release: those whose
// veth is not attached at two sweeps in a row. An attachment has no veth
// only between dockerd's RequestAddress and Join, and between its Leave
// and ReleaseAddress, which take milliseconds; one that stays so is
// dockerd's leftover: an address it was given and never made an endpoint
// of (it crashed, or its endpoint's creation failed and the release was
// lost), or the endpoint of a container that went while dockerd or
// overlayd was down. Its address is released and its endpoint record
// deleted; a late Leave, DeleteEndpoint or ReleaseAddress for it is
// answered without effect.
func (b *dockerBackend) Sweep(ctx context.Context, interval time.Duration, networks func() []string) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		if err := b.sweep(ctx, networks()); err != nil {
			b.log.Warn("docker: collecting leftover attachments", "err", err)
		}
	}
}

// sweep is one pass of Sweep.
func (b *dockerBackend) sweep(ctx context.Context, networks []string) error {
	var errs []error
	unwired := map[dockerAttachment]netip.Prefix{}
	for _, name := range networks {
		list, err := b.svc.Allocations(ctx, name)
		if err != nil {
			if attach.KindOf(err) != attach.Starting {
				errs = append(errs, err)
			}
			continue
		}
		for _, al := range list {
			if !strings.HasPrefix(al.Key.ContainerID, dockerKeyPrefix) {
				continue
			}
			state, err := b.links.State(overlay.HostVethName(name, al.Key))
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if state != hostlink.Attached {
				unwired[dockerAttachment{name, al.Key}] = al.Addr
			}
		}
	}
	b.mu.Lock()
	before := b.unwired
	b.unwired = unwired
	b.mu.Unlock()
	var collect []dockerAttachment
	for a, addr := range unwired {
		if before[a] == addr {
			collect = append(collect, a)
		}
	}
	if len(collect) == 0 {
		return errors.Join(errs...)
	}
	eps, err := b.store.DockerEndpoints(ctx, b.host)
	if err != nil && eps == nil {
		return errors.Join(append(errs, fmt.Errorf("read this host's Docker endpoints: %w", err))...)
	}
	for _, a := range collect {
		// A Join since the first look (dockerd can be slow) wins.
		if state, err := b.links.State(overlay.HostVethName(a.network, a.key)); err != nil || state == hostlink.Attached {
			continue
		}
		if err := b.svc.Detach(ctx, attach.Request{Network: a.network, Key: a.key}); err != nil {
			errs = append(errs, err)
			continue
		}
		endpoint := ""
		for id, ep := range eps {
			if ep.Network == a.network && ep.Key == a.key {
				endpoint = id
				if err := b.store.DeleteDockerEndpoint(ctx, b.host, id); err != nil {
					errs = append(errs, err)
				}
			}
		}
		b.log.Info("docker: released the address of an endpoint dockerd left", "network", a.network, "addr", unwired[a], "key", a.key, "endpoint", endpoint)
		b.mu.Lock()
		delete(b.unwired, a)
		b.mu.Unlock()
	}
	return errors.Join(errs...)
}

// ProgramExternalConnectivity refuses published ports: see docs/docker.md.
func (b *dockerBackend) ProgramExternalConnectivity(_ context.Context, r cnm.ProgramExternalConnectivityRequest) error {
	if pm, ok := r.Options["com.docker.network.portmap"].([]any); ok && len(pm) > 0 {
		return errors.New("published ports (docker run -p) are not supported on this driver's networks: containers are reachable at their overlay address from every host; publish a port through a second network of Docker's bridge driver, or a load balancer")
	}
	return nil
}

// RevokeExternalConnectivity has nothing to undo.
func (b *dockerBackend) RevokeExternalConnectivity(context.Context, cnm.EndpointRequest) error {
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n/2)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// DefaultDockerSocket is where overlayd serves Docker's plugin protocols
// by default: dockerd finds the plugin "overlaynet" by this name.
const DefaultDockerSocket = "/run/docker/plugins/overlaynet.sock"

// errDockerStarting answers dockerd while overlayd starts.
var errDockerStarting = errors.New("overlayd is starting; try again in a moment")

// startingDocker answers every request of dockerd's but the fixed ones
// with errDockerStarting, until the host runtime exists: the socket is
// there from overlayd's first moment, so that dockerd, which waits 15 s
// for a plugin whose socket is missing, finds it at once.
type startingDocker struct{}

var _ cnm.Backend = startingDocker{}

func (startingDocker) RequestPool(context.Context, cnm.RequestPoolRequest) (cnm.RequestPoolResponse, error) {
	return cnm.RequestPoolResponse{}, errDockerStarting
}
func (startingDocker) ReleasePool(context.Context, cnm.ReleasePoolRequest) error {
	return errDockerStarting
}
func (startingDocker) RequestAddress(context.Context, cnm.RequestAddressRequest) (cnm.RequestAddressResponse, error) {
	return cnm.RequestAddressResponse{}, errDockerStarting
}
func (startingDocker) ReleaseAddress(context.Context, cnm.ReleaseAddressRequest) error {
	return errDockerStarting
}
func (startingDocker) CreateNetwork(context.Context, cnm.CreateNetworkRequest) error {
	return errDockerStarting
}
func (startingDocker) DeleteNetwork(context.Context, cnm.NetworkRequest) error {
	return errDockerStarting
}
func (startingDocker) CreateEndpoint(context.Context, cnm.CreateEndpointRequest) (cnm.CreateEndpointResponse, error) {
	return cnm.CreateEndpointResponse{}, errDockerStarting
}
func (startingDocker) EndpointOperInfo(context.Context, cnm.EndpointRequest) (cnm.EndpointOperInfoResponse, error) {
	return cnm.EndpointOperInfoResponse{}, errDockerStarting
}
func (startingDocker) DeleteEndpoint(context.Context, cnm.EndpointRequest) error {
	return errDockerStarting
}
func (startingDocker) Join(context.Context, cnm.JoinRequest) (cnm.JoinResponse, error) {
	return cnm.JoinResponse{}, errDockerStarting
}
func (startingDocker) Leave(context.Context, cnm.EndpointRequest) error { return errDockerStarting }
func (startingDocker) ProgramExternalConnectivity(context.Context, cnm.ProgramExternalConnectivityRequest) error {
	return errDockerStarting
}
func (startingDocker) RevokeExternalConnectivity(context.Context, cnm.EndpointRequest) error {
	return errDockerStarting
}

// netlinkDockerLinks are the Docker driver's veths on the host's netlink
// handle.
type netlinkDockerLinks struct{ hostlink.Links }

func (netlinkDockerLinks) AddVeth(v hostlink.Veth) error    { return hostlink.AddVeth(v) }
func (netlinkDockerLinks) IfIndex(name string) (int, error) { return hostlink.IfIndex(name) }

// hostRoutes returns the IPv4 routes of the main table of h's namespace.
func hostRoutes(h *netlink.Handle) func() ([]netip.Prefix, error) {
	return func() ([]netip.Prefix, error) {
		rs, err := h.RouteList(nil, netlink.FAMILY_V4)
		if err != nil {
			return nil, err
		}
		var out []netip.Prefix
		for _, r := range rs {
			if r.Dst == nil {
				continue
			}
			if p, ok := netip.AddrFromSlice(r.Dst.IP); ok {
				bits, _ := r.Dst.Mask.Size()
				out = append(out, netip.PrefixFrom(p.Unmap(), bits))
			}
		}
		return out, nil
	}
}
