package embedjoin.searchengine;

import java.net.InetSocketAddress;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

import org.elasticsearch.common.logging.LogConfigurator;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;
import org.elasticsearch.http.HttpServerTransport;
import org.elasticsearch.node.ClasspathPluginsNode;
import org.elasticsearch.node.InternalSettingsPreparer;
import org.elasticsearch.transport.netty4.Netty4Plugin;

/**
 * One real Elasticsearch node for tests and local runs, from the server jar and the
 * transport-netty4 plugin on the classpath (no distribution, no Docker); see {@link Launcher}
 * for the command line. {@code GET /} comes from {@link RootPlugin}.
 */
public final class SearchEngine implements Launcher.Node {
    private volatile org.elasticsearch.node.Node node;

    public static void main(String[] args) {
        Launcher.main(args, new SearchEngine());
    }

    @Override
    public int start(Path home, int port) throws Exception {
        Settings settings = Settings.builder().loadFromMap(Launcher.nodeSettings(home, port)).build();
        LogConfigurator.configureESLogging();
        LogConfigurator.configureWithoutConfig(settings);
        Environment environment = InternalSettingsPreparer.prepareEnvironment(settings, Map.of(), null, () -> "search-engine");
        node = new ClasspathPluginsNode(environment, List.of(Netty4Plugin.class, RootPlugin.class));
        node.start();
        InetSocketAddress address = node.injector().getInstance(HttpServerTransport.class).boundAddress().publishAddress().address();
        return address.getPort();
    }

    @Override
    public void close() throws Exception {
        org.elasticsearch.node.Node n = node;
        if (n != null) {
            n.prepareForClose();
            n.close();
            n.awaitClose(30, TimeUnit.SECONDS);
        }
    }
}
