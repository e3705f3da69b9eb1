package daemon

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/overlaynet/overlay/overlay"
)

// hostIDFile is the file in the data directory that keeps the host ID.
const hostIDFile = "host-id"

// hostIDBytes is the number of random bytes of a host ID (32 hex digits).
const hostIDBytes = 16

var hostIDRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// LoadIdentity returns the host ID kept in dir, generating and keeping a
// new random one the first time. The ID never derives from an address,
// so a host keeps it when its underlay address changes.
func LoadIdentity(dir string) (overlay.HostID, error) {
	path := filepath.Join(dir, hostIDFile)
	if b, err := os.ReadFile(path); err == nil {
		id := strings.TrimSpace(string(b))
		if !hostIDRE.MatchString(id) {
			return "", fmt.Errorf("host ID in %s is malformed (%q): remove the file to generate a new one", path, id)
		}
		return overlay.HostID(id), nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read host ID: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("create data directory: %w", err)
	}
	var b [hostIDBytes]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate host ID: %w", err)
	}
	id := hex.EncodeToString(b[:])
	// Write to a temporary file and link it into place, so that two
	// overlayd starting at once cannot both keep a different ID.
	tmp, err := os.CreateTemp(dir, hostIDFile+".tmp*")
	if err != nil {
		return "", fmt.Errorf("write host ID: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(id + "\n"); err != nil {
		tmp.Close()
		return "", fmt.Errorf("write host ID: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return "", fmt.Errorf("write host ID: %w", err)
	}
	tmp.Close()
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return LoadIdentity(dir)
		}
		return "", fmt.Errorf("keep host ID: %w", err)
	}
	return overlay.HostID(id), nil
}

// VTEPMAC derives the MAC address of a host's VXLAN devices from its ID:
// locally administered, unicast, and the same after every restart.
func VTEPMAC(h overlay.HostID) net.HardwareAddr {
	return derivedMAC("overlay-vtep:" + string(h))
}

// BridgeMAC derives the MAC address of the bridge of network on host h,
// the containers' gateway: locally administered, unicast, the same after
// every restart, and different from every VTEP MAC and from the bridges
// of the host's other networks.
func BridgeMAC(h overlay.HostID, network string) net.HardwareAddr {
	return derivedMAC("overlay-bridge:" + string(h) + "/" + network)
}

// derivedMAC returns a locally administered unicast MAC address that is a
// hash of seed.
func derivedMAC(seed string) net.HardwareAddr {
	sum := sha256.Sum256([]byte(seed))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = (mac[0] | 0x02) &^ 0x01
	return mac
}
