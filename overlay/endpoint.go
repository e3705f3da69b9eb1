package overlay

import (
	"crypto/rand"
	"fmt"
	"maps"
	"net"
	"slices"
)

// Endpoint is what a container interface is beyond its address: CNM's
// endpoint. Its MAC address and labels are decided with the address, kept
// with it in the host's record and copied to the store with it.
type Endpoint struct {
	// MAC is the container interface's MAC address, or nil when it is not
	// known (an allocation made by an older overlayd).
	MAC net.HardwareAddr
	// Labels are the endpoint's key/value labels (CNI args.cni.labels and
	// runtimeConfig.labels).
	Labels map[string]string
}

// MaxEndpointLabelBytes bounds the sum of the lengths of an endpoint's
// label keys and values. An endpoint's labels are stored with every
// allocation of it, so they are bounded much tighter than a network's.
const MaxEndpointLabelBytes = 4096

// Validate checks the MAC address (unicast Ethernet, when given) and the
// labels (ValidateLabels and MaxEndpointLabelBytes), naming what is wrong.
func (e Endpoint) Validate() error {
	if e.MAC != nil {
		if err := ValidateMAC(e.MAC); err != nil {
			return err
		}
	}
	if err := ValidateLabels(e.Labels); err != nil {
		return err
	}
	size := 0
	for k, v := range e.Labels {
		size += len(k) + len(v)
	}
	if size > MaxEndpointLabelBytes {
		return fmt.Errorf("endpoint labels of %d bytes: want at most %d", size, MaxEndpointLabelBytes)
	}
	return nil
}

// ValidateMAC returns an error, saying why, unless mac is a non-zero
// unicast Ethernet address.
func ValidateMAC(mac net.HardwareAddr) error {
	if len(mac) != 6 || mac[0]&1 != 0 {
		return fmt.Errorf("mac %s: want a unicast Ethernet address", mac)
	}
	if slices.Equal(mac, make(net.HardwareAddr, 6)) {
		return fmt.Errorf("mac %s: want a non-zero address", mac)
	}
	return nil
}

// Equal reports whether e and o have the same MAC address and labels.
func (e Endpoint) Equal(o Endpoint) bool {
	return slices.Equal(e.MAC, o.MAC) && maps.Equal(e.Labels, o.Labels)
}

// Clone returns a copy of e that shares no memory with it.
func (e Endpoint) Clone() Endpoint {
	return Endpoint{MAC: slices.Clone(e.MAC), Labels: maps.Clone(e.Labels)}
}

// IsZero reports whether e says nothing: no MAC address and no labels.
func (e Endpoint) IsZero() bool { return len(e.MAC) == 0 && len(e.Labels) == 0 }

// RandomMAC returns a random locally administered unicast MAC address:
// 46 random bits, so that two containers of one network share one with
// a chance of about n²/2⁴⁷.
func RandomMAC() net.HardwareAddr {
	mac := make(net.HardwareAddr, 6)
	rand.Read(mac)         // never fails (crypto/rand)
	mac[0] = mac[0]&^1 | 2 // unicast, locally administered
	return mac
}
