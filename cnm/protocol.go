// Package cnm serves Docker's Container Network Model to dockerd: the
// remote network driver and the remote IPAM driver protocols of
// libnetwork, JSON over HTTP on a plugin socket in /run/docker/plugins.
// It speaks the protocols only: a Backend (overlayd's, over the same
// attachment service as the CNI socket) decides everything.
//
// The two protocols share one socket and one Plugin.Activate answer, so
// that `docker network create -d NAME --ipam-driver NAME` names one
// plugin. Every failure is answered with HTTP 500 and {"Err": "..."},
// which dockerd's plugin client reports for both protocols.
//
// docker/go-plugins-helpers serves the same protocols, but one driver per
// socket (each handler answers Plugin.Activate with its own manifest), its
// driver methods take no context, and it writes stream errors to standard
// output: the types here are written from libnetwork's documentation of
// the wire format instead.
package cnm

// Paths of the protocols' requests, each a POST.
const (
	ActivatePath = "/Plugin.Activate"

	NetworkCapabilitiesPath  = "/NetworkDriver.GetCapabilities"
	CreateNetworkPath        = "/NetworkDriver.CreateNetwork"
	DeleteNetworkPath        = "/NetworkDriver.DeleteNetwork"
	AllocateNetworkPath      = "/NetworkDriver.AllocateNetwork"
	FreeNetworkPath          = "/NetworkDriver.FreeNetwork"
	CreateEndpointPath       = "/NetworkDriver.CreateEndpoint"
	EndpointOperInfoPath     = "/NetworkDriver.EndpointOperInfo"
	DeleteEndpointPath       = "/NetworkDriver.DeleteEndpoint"
	JoinPath                 = "/NetworkDriver.Join"
	LeavePath                = "/NetworkDriver.Leave"
	DiscoverNewPath          = "/NetworkDriver.DiscoverNew"
	DiscoverDeletePath       = "/NetworkDriver.DiscoverDelete"
	ProgramExternalConnPath  = "/NetworkDriver.ProgramExternalConnectivity"
	RevokeExternalConnPath   = "/NetworkDriver.RevokeExternalConnectivity"
	IPAMCapabilitiesPath     = "/IpamDriver.GetCapabilities"
	DefaultAddressSpacesPath = "/IpamDriver.GetDefaultAddressSpaces"
	RequestPoolPath          = "/IpamDriver.RequestPool"
	ReleasePoolPath          = "/IpamDriver.ReleasePool"
	RequestAddressPath       = "/IpamDriver.RequestAddress"
	ReleaseAddressPath       = "/IpamDriver.ReleaseAddress"
)

// ContentType is the media type of the plugin protocol's bodies.
const ContentType = "application/vnd.docker.plugins.v1.2+json"

// Docker's option keys that the protocols carry.
const (
	// GenericOption holds, in CreateNetwork's and CreateEndpoint's
	// options, the user's --opt values as a map of strings.
	GenericOption = "com.docker.network.generic"
	// RequestAddressTypeOption, in RequestAddress's options, says what
	// the address is for; GatewayAddressType is the network's gateway.
	RequestAddressTypeOption = "RequestAddressType"
	GatewayAddressType       = "com.docker.network.gateway"
)

// ErrorResponse is the body of every failed answer.
type ErrorResponse struct {
	Err string
}

// ActivateResponse says which protocols the plugin implements.
type ActivateResponse struct {
	Implements []string
}

// NetworkCapabilities is the network driver's GetCapabilities answer.
type NetworkCapabilities struct {
	// Scope is where the driver's networks and endpoints live: "global"
	// for one that spans hosts; ConnectivityScope likewise.
	Scope             string
	ConnectivityScope string
}

// IPAMData is one address pool of a network as dockerd passes it to the
// network driver.
type IPAMData struct {
	AddressSpace string
	Pool         string
	Gateway      string
	AuxAddresses map[string]any
}

// CreateNetworkRequest asks the network driver to create a network.
type CreateNetworkRequest struct {
	NetworkID string
	Options   map[string]any
	IPv4Data  []IPAMData
	IPv6Data  []IPAMData
}

// NetworkRequest names a network: DeleteNetwork's, AllocateNetwork's
// and FreeNetwork's request.
type NetworkRequest struct {
	NetworkID string
}

// EndpointInterface is an endpoint's interface: its addresses, in CIDR
// form, and MAC address.
type EndpointInterface struct {
	Address     string `json:",omitempty"`
	AddressIPv6 string `json:",omitempty"`
	MacAddress  string `json:",omitempty"`
}

// CreateEndpointRequest asks the network driver to create an endpoint;
// Interface holds what IPAM gave it.
type CreateEndpointRequest struct {
	NetworkID  string
	EndpointID string
	Interface  *EndpointInterface
	Options    map[string]any
}

// CreateEndpointResponse gives back what the driver chose of the
// interface; nil when it kept what it was given.
type CreateEndpointResponse struct {
	Interface *EndpointInterface `json:",omitempty"`
}

// EndpointRequest names an endpoint: DeleteEndpoint's, EndpointOperInfo's,
// Leave's and RevokeExternalConnectivity's request.
type EndpointRequest struct {
	NetworkID  string
	EndpointID string
}

// EndpointOperInfoResponse is what the driver reports of an endpoint.
type EndpointOperInfoResponse struct {
	Value map[string]any
}

// JoinRequest asks the network driver to put an endpoint into a sandbox
// (a container's network namespace, at SandboxKey).
type JoinRequest struct {
	NetworkID  string
	EndpointID string
	SandboxKey string
	Options    map[string]any
}

// InterfaceName is the interface dockerd moves into the sandbox: SrcName
// on the host, renamed DstPrefix followed by a number.
type InterfaceName struct {
	SrcName   string
	DstPrefix string
}

// StaticRoute is a route dockerd adds in the sandbox.
type StaticRoute struct {
	Destination string
	RouteType   int
	NextHop     string `json:",omitempty"`
}

// JoinResponse says how to wire the sandbox.
type JoinResponse struct {
	InterfaceName         InterfaceName
	Gateway               string        `json:",omitempty"`
	StaticRoutes          []StaticRoute `json:",omitempty"`
	DisableGatewayService bool
}

// ProgramExternalConnectivityRequest asks the driver to publish an
// endpoint's ports (docker run -p).
type ProgramExternalConnectivityRequest struct {
	NetworkID  string
	EndpointID string
	Options    map[string]any
}

// IPAMCapabilities is the IPAM driver's GetCapabilities answer.
type IPAMCapabilities struct {
	// RequiresMACAddress makes dockerd send the endpoint's MAC address
	// with its address request.
	RequiresMACAddress bool
	// RequiresRequestReplay makes dockerd request its pools and
	// addresses again after it restarts.
	RequiresRequestReplay bool
}

// AddressSpaces is the IPAM driver's GetDefaultAddressSpaces answer.
type AddressSpaces struct {
	LocalDefaultAddressSpace  string
	GlobalDefaultAddressSpace string
}

// RequestPoolRequest asks for an address pool: Pool in CIDR form, or ""
// for one the driver chooses.
type RequestPoolRequest struct {
	AddressSpace string
	Pool         string
	SubPool      string
	Options      map[string]string
	V6           bool
}

// RequestPoolResponse names the pool: PoolID is the same for the same
// pool every time.
type RequestPoolResponse struct {
	PoolID string
	Pool   string
	Data   map[string]string `json:",omitempty"`
}

// ReleasePoolRequest releases a pool.
type ReleasePoolRequest struct {
	PoolID string
}

// RequestAddressRequest asks for an address of a pool: Address, when
// set, is the one wanted (A.B.C.D).
type RequestAddressRequest struct {
	PoolID  string
	Address string
	Options map[string]string
}

// RequestAddressResponse is the address given, in CIDR form.
type RequestAddressResponse struct {
	Address string
	Data    map[string]string `json:",omitempty"`
}

// ReleaseAddressRequest releases an address of a pool.
type ReleaseAddressRequest struct {
	PoolID  string
	Address string
}
