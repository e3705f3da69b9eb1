package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	sd "github.com/coreos/go-systemd/v22/daemon"
)

// notifier tells systemd how overlayd's start goes, when it is ready and
// when it stops, and pings its watchdog while overlayd makes progress
// (sd_notify(3)). Without NOTIFY_SOCKET, as outside a Type=notify unit,
// it sends nothing. It is safe for concurrent use.
type notifier struct {
	send func(state string) (bool, error) // sd.SdNotify
	log  *slog.Logger
}

func newNotifier(log *slog.Logger) *notifier {
	return &notifier{send: func(state string) (bool, error) { return sd.SdNotify(false, state) }, log: log}
}

// notify sends state; a failure is logged at debug level: systemd that
// cannot be told is no reason to stop.
func (n *notifier) notify(state string) {
	if _, err := n.send(state); err != nil {
		n.log.Debug("sd_notify failed", "state", state, "err", err)
	}
}

// status sends a STATUS line, which `systemctl status` shows.
func (n *notifier) status(format string, args ...any) {
	n.notify("STATUS=" + fmt.Sprintf(format, args...))
}

// ready says overlayd serves ADD.
func (n *notifier) ready(status string) { n.notify(sd.SdNotifyReady + "\nSTATUS=" + status) }

// stopping says overlayd is stopping.
func (n *notifier) stopping() { n.notify(sd.SdNotifyStopping + "\nSTATUS=stopping") }

// watchdog pings systemd's watchdog every interval (half of WatchdogSec)
// while stalled returns nil, until ctx is done. While it returns an
// error (a reconcile loop that made no pass for too long), it sends no
// ping, so that systemd restarts overlayd once WatchdogSec has passed,
// and says why in the log and in the unit's status. It returns ctx's
// error.
func (n *notifier) watchdog(ctx context.Context, interval time.Duration, stalled func(now time.Time) error) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	var was error
	for {
		err := stalled(time.Now())
		switch {
		case err == nil && was != nil:
			n.log.Info("progress again; pinging systemd's watchdog again")
			n.notify(sd.SdNotifyWatchdog + "\nSTATUS=ready")
		case err == nil:
			n.notify(sd.SdNotifyWatchdog)
		case was == nil || err.Error() != was.Error():
			n.log.Error("not pinging systemd's watchdog: systemd restarts overlayd unless it makes progress again", "err", err)
			n.status("stalled: %v", err)
		}
		was = err
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// stallAfter is how long a network's reconcile loop may end no pass
// before the watchdog stops being pinged: twice the resync interval (a
// loop passes at least once per interval) and the longest a pass waits
// for etcd and the kernel (10 s).
func stallAfter(resync time.Duration) time.Duration { return 2*resync + 10*time.Second }

// watchdogInterval returns how often to ping systemd's watchdog: half of
// WatchdogSec, or 0 when the unit has no watchdog (or it is not this
// process's).
func watchdogInterval() (time.Duration, error) {
	d, err := sd.SdWatchdogEnabled(false)
	if err != nil {
		return 0, fmt.Errorf("systemd watchdog: %w", err)
	}
	return d / 2, nil
}
